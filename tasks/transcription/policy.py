"""The error policy: what a failed transcription attempt leads to.

Permanent failures (the service refused the audio, the prepared file is missing, differs from
its recorded sha256 or cannot be decoded) are recorded as `failed` with the reason at once.
Anything else is retried with exponential backoff and jitter (a Celery retry whose countdown
stays well below the broker's visibility timeout) until the call used up
TRANSCRIBE_MAX_ATTEMPTS, then recorded as `failed`.
The database counts the attempts, across retries and re-dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.audio.codec import AudioDecodeError
from workers.audio.store import StoredAudioMismatch
from workers.core.backoff import backoff_sec
from workers.core.settings import Settings
from workers.core.text import error_text
from workers.recognizers import PermanentRecognitionError, TransientRecognitionError

# Failures no retry can mend.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    PermanentRecognitionError,
    AudioDecodeError,
    FileNotFoundError,
    StoredAudioMismatch,  # never a transcript of other audio than the call's
)


@dataclass(frozen=True)
class RetryLater:
    countdown: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


def out_of_attempts(attempts: int, settings: Settings) -> bool:
    return attempts >= settings.transcription.max_attempts


def gave_up(attempts: int, last_error: str | None) -> str:
    return f"gave up after {attempts} attempts; last error: {last_error or 'none'}"


def after_failed_attempt(
    attempt: int, reason: str, settings: Settings, retry_after: float | None = None
) -> RetryLater | GiveUp:
    """A retry after a backoff, or none when `attempt` was the last one allowed."""
    if out_of_attempts(attempt, settings):
        return GiveUp(gave_up(attempt, reason))
    return RetryLater(retry_wait(attempt, settings, retry_after))


def retry_wait(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """The wait before the retry of failed attempt `attempt` (workers.core.backoff), with
    TRANSCRIBE_RETRY_BACKOFF_SEC doubling up to TRANSCRIBE_RETRY_BACKOFF_MAX_SEC."""
    return backoff_sec(
        attempt,
        settings.transcription.retry_backoff_sec,
        settings.transcription.retry_backoff_max_sec,
        retry_after,
    )


def reason(exc: BaseException) -> str:
    """The reason recorded for a failure: what it says, named where it does not say it."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        text = f"prepared audio is missing: {exc.filename}"
    elif isinstance(exc, StoredAudioMismatch):
        text = f"prepared audio is corrupt: {exc}"
    elif isinstance(exc, AudioDecodeError):
        text = f"prepared audio cannot be decoded: {exc}"
    elif not isinstance(exc, PermanentRecognitionError | TransientRecognitionError):
        text = f"{type(exc).__name__}: {text}"
    return error_text(text)
