"""Helpers for the transcription tests: the openai backend's settings against the fake service,
a call dispatched by hand, as the dispatcher does it, and starting a transcription worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.transcription.dispatch import TRANSCRIBE_TASK
from tests.support.procs import start_worker

if TYPE_CHECKING:
    from pathlib import Path

    from celery import Celery

    from tests.transcription.conftest import Calls
    from tests.transcription.fake_openai import FakeTranscriptionService
    from workers.dev.procs import Proc


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


def send_to_transcribe(calls: Calls, client: Celery, call_id: int | None = None) -> int:
    """What the dispatcher does for one call (by default a new ready one): mark it dispatched,
    send its message. Returns the call's id."""
    if call_id is None:
        call_id = calls.add()
    mark_dispatched(calls, call_id)
    client.send_task(TRANSCRIBE_TASK, kwargs={"call_id": call_id}, queue="transcription")
    return call_id


def start_transcription(
    procs: list[Proc], env: dict[str, str], tmp_path: Path, name: str = "asr", concurrency: int = 1
) -> Proc:
    """A transcription worker, stopped with `procs`."""
    worker = start_worker(name, env, tmp_path, queues="transcription", concurrency=concurrency)
    procs.append(worker)
    return worker
