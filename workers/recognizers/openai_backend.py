"""Any OpenAI-compatible transcription service: `POST {base}/audio/transcriptions`.

OpenAI itself, faster-whisper servers, the whisper.cpp server and vLLM all take the same
multipart form: the file, `model`, `language`, a `prompt` (here: the custom vocabulary, which
Whisper then spells as given) and `response_format=verbose_json`, whose segments carry times,
`avg_logprob` (the confidence) and `no_speech_prob`. Segments the model itself thinks are
probably not speech are dropped: radio hiss makes Whisper invent whole sentences.

The request runs on the process's shared httpx client (workers.core.runtime) with its own read
timeout and an overall deadline. The transient statuses (429, 5xx, ... as workers.clients.http
classifies them) are retried, their Retry-After passed on; other refusals are permanent for
this call, with the service's message as the reason.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import httpx

from workers.clients.http import StatusClass, retry_after_of, status_class
from workers.core.runtime import Runtime
from workers.core.settings import TranscriptionSettings
from workers.recognizers import (
    PermanentRecognitionError,
    Recognition,
    RecognizerConfigError,
    Segment,
    TransientRecognitionError,
    vocabulary_terms,
)


class OpenAIRecognizer:
    backend = "openai"

    def __init__(self, transcription: TranscriptionSettings) -> None:
        if not transcription.openai_model:
            raise RecognizerConfigError("TRANSCRIBE_OPENAI_MODEL must be set")
        self.transcription = transcription
        self.model = transcription.openai_model
        self.url = transcription.openai_base_url.rstrip("/") + "/audio/transcriptions"
        self.prompt = prompt_for(vocabulary_terms(transcription.vocabulary))
        self.language = transcription.language.split("-")[0].lower() or None

    def transcribe(self, audio_path: Path, *, name: str) -> Recognition:
        audio = audio_path.read_bytes()
        rt = Runtime.current()
        return rt.run(self.transcribe_bytes(rt.http, audio, name))

    async def transcribe_bytes(
        self, http: httpx.AsyncClient, audio: bytes, name: str
    ) -> Recognition:
        s = self.transcription
        form = {
            "model": self.model,
            "response_format": "verbose_json",
            "temperature": "0",
            "timestamp_granularities[]": "segment",
        }
        if self.language:
            form["language"] = self.language
        if self.prompt:
            form["prompt"] = self.prompt
        headers = {"Accept": "application/json"}
        key = s.openai_api_key
        if key:
            headers["Authorization"] = f"Bearer {key.reveal()}"
        limit = s.openai_timeout_sec
        # Reading the answer takes as long as recognition: the shared client's connect and
        # pool timeouts (HTTP_CONNECT_TIMEOUT_SEC) stay, read and write get this limit.
        timeout = httpx.Timeout(
            connect=http.timeout.connect, read=limit, write=limit, pool=http.timeout.pool
        )
        try:
            async with asyncio.timeout(limit):
                response = await http.post(
                    self.url,
                    data=form,
                    files={"file": (name, audio, "audio/flac")},
                    headers=headers,
                    timeout=timeout,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise TransientRecognitionError(
                f"{self.url}: no answer within {limit:g}s (TRANSCRIBE_OPENAI_TIMEOUT_SEC)"
            ) from None
        except httpx.TransportError as exc:
            raise TransientRecognitionError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        return self.parse_response(response)

    def parse_response(self, response: httpx.Response) -> Recognition:
        status = response.status_code
        kind = status_class(status)
        if kind is StatusClass.TRANSIENT:
            said = "429 rate limited" if status == 429 else f"HTTP {status}"
            raise TransientRecognitionError(
                f"{self.url}: {said}: {_error_message(response)}",
                retry_after=retry_after_of(response),
            )
        if kind is StatusClass.PERMANENT:
            raise PermanentRecognitionError(
                f"{self.url}: HTTP {status}: {_error_message(response)}"
            )
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PermanentRecognitionError(
                f"{self.url}: the answer is not JSON (is response_format=verbose_json "
                f"supported?): {response.text[:200]!r}"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise PermanentRecognitionError(f"{self.url}: no text in the answer: {str(body)[:200]}")
        return parse_verbose_json(
            body,
            model=self.model,
            language=self.language,
            no_speech_threshold=self.transcription.no_speech_threshold,
        )


def prompt_for(terms: list[str]) -> str:
    """Whisper continues its prompt's style and spelling: a plain list of the terms works."""
    return ", ".join(terms) + "." if terms else ""


def parse_verbose_json(
    body: dict[str, Any], *, model: str, language: str | None, no_speech_threshold: float
) -> Recognition:
    """The transcript from a verbose_json answer, without the segments that are probably not
    speech. Confidence: exp of the duration-weighted mean avg_logprob of the kept segments."""
    raw_segments = body.get("segments")
    duration = _number(body.get("duration"))
    if not isinstance(raw_segments, list):
        # A plain `json` answer from a server that ignores verbose_json: text only.
        text = " ".join(body["text"].split())
        return Recognition(text, model, body.get("language") or language, None, [], duration)
    kept: list[Segment] = []
    weighted, total = 0.0, 0.0
    for seg in raw_segments:
        if not isinstance(seg, dict):
            continue
        no_speech = _number(seg.get("no_speech_prob"))
        if no_speech is not None and no_speech > no_speech_threshold:
            continue
        text = " ".join(str(seg.get("text") or "").split())
        if not text:
            continue
        start, end = _number(seg.get("start")) or 0.0, _number(seg.get("end")) or 0.0
        logprob = _number(seg.get("avg_logprob"))
        confidence = _unit(math.exp(logprob)) if logprob is not None else None
        kept.append(Segment(round(start, 2), round(end, 2), text, confidence))
        if logprob is not None:
            weight = max(end - start, 0.01)
            weighted += logprob * weight
            total += weight
    return Recognition(
        text=" ".join(s.text for s in kept),
        model=model,
        language=str(body.get("language") or language or "") or None,
        confidence=_unit(math.exp(weighted / total)) if total else None,
        segments=kept,
        audio_duration_sec=duration,
    )


def _error_message(response: httpx.Response) -> str:
    """OpenAI-style {"error": {"message": ...}}, else the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body
    except Exception:
        message = response.text
    return " ".join(str(message).split())[:300]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _unit(value: float) -> float:
    return round(min(1.0, max(0.0, value)), 4)
