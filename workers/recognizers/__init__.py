"""Speech recognisers behind one small interface, chosen by TRANSCRIBE_BACKEND.

    recognizer = process_recognizer(settings.transcription)   # made once per process
    result = recognizer.transcribe(Path("call.flac"), name="call-42.flac")

`transcribe` is blocking: the whisper and pocketsphinx backends are CPU work, the openai backend
drives its HTTP request on the process's event loop (workers.core.runtime). Call it from a
Celery task in a pool process, never from a coroutine.

TRANSCRIBE_BACKEND=auto (the default) is whisper when faster-whisper and a model are installed
(the `whisper` extra ships tiny.en), else pocketsphinx, with a WARNING saying why. A whisper
model that is configured but missing, or whose checksum is wrong, is an error, never a
fallback.

Errors say what to do next: `TransientRecognitionError` (try again later, maybe after
`retry_after` seconds), `PermanentRecognitionError` (this call's audio will never work), and
`RecognizerConfigError` (the settings are wrong: stop start-up with the message).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from workers.core.settings import PoolSettings, TranscriptionSettings

log = logging.getLogger(__name__)


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
class Word:
    start: float  # seconds from the start of the call
    end: float
    text: str
    confidence: float | None = None  # 0..1


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the call
    end: float
    text: str
    confidence: float | None = None  # 0..1
    # Each word with its times, where the backend gives them (whisper, pocketsphinx, and the
    # openai backend when the service answers with words); empty otherwise.
    words: list[Word] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DroppedSegment:
    """A segment the recogniser produced and the pipeline did not believe (kept for review)."""

    start: float
    end: float
    text: str
    reason: str  # e.g. "no_speech_prob 0.95 > 0.6"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class EmptyReason(StrEnum):
    """Why a transcript has no text (transcripts.empty_reason)."""

    NO_SPEECH = "no_speech"  # the recogniser found no speech
    DROPPED = "dropped"  # it produced text, and every segment was dropped as unreliable


@dataclass(frozen=True)
class Recognition:
    text: str
    model: str
    language: str | None
    confidence: float | None  # 0..1, None when the recogniser gives none
    segments: list[Segment] = field(default_factory=list)
    audio_duration_sec: float | None = None
    dropped: list[DroppedSegment] = field(default_factory=list)

    @property
    def empty_reason(self) -> EmptyReason | None:
        if self.text:
            return None
        return EmptyReason.DROPPED if self.dropped else EmptyReason.NO_SPEECH


class Recognizer(Protocol):
    backend: str  # "whisper", "pocketsphinx" or "openai": stored with each transcript
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


def pool_processes(pools: PoolSettings) -> int:
    """How many transcription processes share this machine's CPUs (TRANSCRIPTION_POOL and
    TRANSCRIPTION_CONCURRENCY: solo runs one, 0 means one per CPU)."""
    if pools.transcription_pool == "solo":
        return 1
    return pools.transcription_concurrency or os.cpu_count() or 1


def build_recognizer(
    transcription: TranscriptionSettings, *, pool_processes: int | None = None
) -> Recognizer:
    """A recogniser for TRANSCRIBE_BACKEND; RecognizerConfigError if it cannot work.

    `pool_processes`: how many recognisers share the CPUs (whisper divides them among its
    threads; None: one per CPU, so one thread each).
    Cheap for whisper: its model is checked here (the file's sha256 for the packaged one) but
    loaded on first use, so a worker's parent process can check the settings without holding
    a model that every pool process would then share or copy."""
    backend = transcription.backend
    if backend == "auto":
        from workers.recognizers.whisper_backend import whisper_unavailable

        why_not = whisper_unavailable(transcription)
        if why_not is None:
            backend = "whisper"
        else:
            log.warning(
                "TRANSCRIBE_BACKEND=auto: using pocketsphinx, not whisper: %s (install the "
                "`whisper` extra: pip install 'bcfy-pipeline[whisper]')",
                why_not,
            )
            if transcription.language.lower() not in ("en", "en-us"):
                raise RecognizerConfigError(
                    f"TRANSCRIBE_LANGUAGE={transcription.language!r}: whisper is not "
                    f"available ({why_not}) and pocketsphinx has only US English"
                )
            backend = "pocketsphinx"
    if backend == "whisper":
        from workers.recognizers.whisper_backend import WhisperRecognizer

        return WhisperRecognizer(transcription, pool_processes=pool_processes)
    if backend == "pocketsphinx":
        from workers.recognizers.pocketsphinx_backend import PocketsphinxRecognizer

        return PocketsphinxRecognizer.from_settings(transcription)
    if backend == "openai":
        from workers.recognizers.openai_backend import OpenAIRecognizer

        return OpenAIRecognizer(transcription)
    raise RecognizerConfigError(f"TRANSCRIBE_BACKEND={transcription.backend!r} is unknown")


_process_recognizer: tuple[int, Recognizer] | None = None


def process_recognizer(
    transcription: TranscriptionSettings, *, pool_processes: int | None = None
) -> Recognizer:
    """This process's recogniser, made on first use (never shared across a fork)."""
    global _process_recognizer
    if _process_recognizer is None or _process_recognizer[0] != os.getpid():
        recognizer = build_recognizer(transcription, pool_processes=pool_processes)
        _process_recognizer = (os.getpid(), recognizer)
    return _process_recognizer[1]


def forget_process_recognizer() -> None:
    """Drop this process's recogniser after an unexpected error: the next call makes a new one,
    rather than trusting a decoder whose state is unknown."""
    global _process_recognizer
    _process_recognizer = None
