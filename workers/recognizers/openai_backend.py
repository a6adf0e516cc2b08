"""Any OpenAI-compatible transcription service: `POST {base}/audio/transcriptions`.

OpenAI itself, faster-whisper servers, the whisper.cpp server and vLLM all take the same
multipart form: the file, `model`, `language`, a `prompt` (here: the custom vocabulary, which
Whisper then spells as given) and `response_format=verbose_json`, whose segments carry times,
`avg_logprob` (the confidence), `no_speech_prob` and `compression_ratio`, and, asked for with
`timestamp_granularities[]=word`, each word's times. Segments are judged as the embedded
whisper backend's are (workers.recognizers.whisper_segments): radio hiss makes Whisper invent
whole sentences.

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
    TransientRecognitionError,
    Word,
    vocabulary_terms,
)
from workers.recognizers.whisper_segments import Candidate, SegmentFilter, judge


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
        self.rule = SegmentFilter.from_settings(transcription)

    def transcribe(self, audio_path: Path, *, name: str) -> Recognition:
        audio = audio_path.read_bytes()
        rt = Runtime.current()
        return rt.run(self.transcribe_bytes(rt.http, audio, name))

    async def transcribe_bytes(
        self, http: httpx.AsyncClient, audio: bytes, name: str
    ) -> Recognition:
        s = self.transcription
        form: dict[str, str | list[str]] = {
            "model": self.model,
            "response_format": "verbose_json",
            "temperature": "0",
            # Both: segments for their figures (no_speech_prob, avg_logprob), words for times.
            "timestamp_granularities[]": ["segment", "word"],
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
        return parse_verbose_json(body, model=self.model, language=self.language, rule=self.rule)


def prompt_for(terms: list[str]) -> str:
    """Whisper continues its prompt's style and spelling: a plain list of the terms works."""
    return ", ".join(terms) + "." if terms else ""


def parse_verbose_json(
    body: dict[str, Any], *, model: str, language: str | None, rule: SegmentFilter
) -> Recognition:
    """The transcript from a verbose_json answer, without the segments the rule drops
    (workers.recognizers.whisper_segments). Words, when the service sends them (a top-level
    `words` list: OpenAI with timestamp_granularities[]=word), go to the segment they fall in;
    a service that sends none leaves each segment's words empty."""
    raw_segments = body.get("segments")
    duration = _number(body.get("duration"))
    if not isinstance(raw_segments, list):
        # A plain `json` answer from a server that ignores verbose_json: text only.
        text = " ".join(body["text"].split())
        return Recognition(text, model, body.get("language") or language, None, [], duration)
    words = _words(body.get("words"))
    candidates: list[Candidate] = []
    for seg in raw_segments:
        if not isinstance(seg, dict):
            continue
        start, end = _number(seg.get("start")) or 0.0, _number(seg.get("end")) or 0.0
        # A word belongs to the segment its middle falls in.
        inside = [w for w in words if start <= (w.start + w.end) / 2 <= end]
        candidates.append(
            Candidate(
                start=start,
                end=end,
                text=str(seg.get("text") or ""),
                avg_logprob=_number(seg.get("avg_logprob")),
                no_speech_prob=_number(seg.get("no_speech_prob")),
                compression_ratio=_number(seg.get("compression_ratio")),
                words=inside,
            )
        )
    judged = judge(candidates, rule)
    return Recognition(
        text=judged.text,
        model=model,
        language=str(body.get("language") or language or "") or None,
        confidence=judged.confidence,
        segments=judged.segments,
        audio_duration_sec=duration,
        dropped=judged.dropped,
    )


def _words(raw: Any) -> list[Word]:
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        text = " ".join(str(item.get("word") or "").split())
        start, end = _number(item.get("start")), _number(item.get("end"))
        if text and start is not None and end is not None:
            out.append(Word(round(start, 2), round(end, 2), text))
    return out


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
