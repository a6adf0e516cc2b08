"""Helpers for the transcription tests: the openai backend's settings against the fake service,
and a call dispatched by hand, as the dispatcher does it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.transcription.dispatch import TRANSCRIBE_TASK

if TYPE_CHECKING:
    from celery import Celery

    from tests.transcription.conftest import Calls
    from tests.transcription.fake_openai import FakeTranscriptionService


def openai_env(service: FakeTranscriptionService, **extra: str) -> dict[str, str]:
    """The openai backend pointed at the fake service, with limits a test can wait out."""
    return {
        "TRANSCRIBE_BACKEND": "openai",
        "TRANSCRIBE_OPENAI_BASE_URL": service.base_url,
        "TRANSCRIBE_OPENAI_MODEL": "whisper-test",
        "TRANSCRIBE_OPENAI_TIMEOUT_SEC": "30",
        "TRANSCRIBE_SOFT_TIME_LIMIT_SEC": "40",
        "TRANSCRIBE_TIME_LIMIT_SEC": "45",
        **extra,
    }


def mark_dispatched(calls: Calls, call_id: int) -> None:
    """What the dispatcher does before it sends a call's message."""
    calls.update(
        call_id, "state = 'dispatched', dispatch_count = 1, due_at = now() + interval '15 minutes'"
    )


def send_to_transcribe(calls: Calls, client: Celery, call_id: int) -> None:
    """What the dispatcher does for one call: mark it dispatched, send its message."""
    mark_dispatched(calls, call_id)
    client.send_task(TRANSCRIBE_TASK, kwargs={"call_id": call_id}, queue="transcription")
