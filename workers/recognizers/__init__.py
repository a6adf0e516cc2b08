"""Speech recognisers behind one small interface, chosen by TRANSCRIBE_BACKEND.

    recognizer = process_recognizer(settings.transcription)   # made once per process
    result = recognizer.transcribe(Path("call.flac"), name="call-42.flac")

`transcribe` is blocking: the pocketsphinx backend is CPU work, the openai backend drives its
HTTP request on the process's event loop (workers.core.runtime). Call it from a Celery task in
a pool process, never from a coroutine.

Errors say what to do next: `TransientRecognitionError` (try again later, maybe after
`retry_after` seconds), `PermanentRecognitionError` (this call's audio will never work), and
`RecognizerConfigError` (the settings are wrong: stop start-up with the message).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from workers.core.settings import TranscriptionSettings


class RecognitionError(Exception):
    """Recognition of one call failed."""


class TransientRecognitionError(RecognitionError):
    """Worth trying again: the service is busy, down or slow (429, 5xx, timeouts)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentRecognitionError(RecognitionError):
    """Trying again will not help: the audio or the request is refused for good."""


class RecognizerConfigError(ValueError):
    """The recogniser cannot be set up from these settings (the message names the setting)."""


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the call
    end: float
    text: str
    confidence: float | None = None  # 0..1

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recognition:
    text: str
    model: str
    language: str | None
    confidence: float | None  # 0..1, None when the recogniser gives none
    segments: list[Segment] = field(default_factory=list)
    audio_duration_sec: float | None = None


class Recognizer(Protocol):
    backend: str  # "pocketsphinx" or "openai": stored with each transcript
    model: str

    def transcribe(self, audio_path: Path, *, name: str) -> Recognition:
        """Recognise one 16 kHz mono FLAC file. Blocking."""
        ...


def vocabulary_terms(raw: str) -> list[str]:
    """TRANSCRIBE_VOCABULARY: comma-separated words and phrases, blanks and repeats dropped."""
    terms: list[str] = []
    for part in raw.split(","):
        term = " ".join(part.split())
        if term and term.lower() not in (t.lower() for t in terms):
            terms.append(term)
    return terms


def build_recognizer(transcription: TranscriptionSettings) -> Recognizer:
    """A recogniser for TRANSCRIBE_BACKEND; RecognizerConfigError if it cannot work."""
    if transcription.backend == "pocketsphinx":
        from workers.recognizers.pocketsphinx_backend import PocketsphinxRecognizer

        return PocketsphinxRecognizer.from_settings(transcription)
    if transcription.backend == "openai":
        from workers.recognizers.openai_backend import OpenAIRecognizer

        return OpenAIRecognizer(transcription)
    raise RecognizerConfigError(f"TRANSCRIBE_BACKEND={transcription.backend!r} is unknown")


_process_recognizer: tuple[int, Recognizer] | None = None


def process_recognizer(transcription: TranscriptionSettings) -> Recognizer:
    """This process's recogniser, made on first use (never shared across a fork)."""
    global _process_recognizer
    if _process_recognizer is None or _process_recognizer[0] != os.getpid():
        _process_recognizer = (os.getpid(), build_recognizer(transcription))
    return _process_recognizer[1]


def forget_process_recognizer() -> None:
    """Drop this process's recogniser after an unexpected error: the next call makes a new one,
    rather than trusting a decoder whose state is unknown."""
    global _process_recognizer
    _process_recognizer = None
