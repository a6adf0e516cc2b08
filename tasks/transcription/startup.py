"""The transcription worker's start-up check, connected to Celery's `worker_init` signal.

It lives with the stage, not in workers/app.py, because it is the stage's knowledge: its queue,
its recogniser and TRANSCRIBE_BACKEND. The app's `include` imports this package in the worker's
loader before `worker_init` is sent, so the handler is connected in time.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from tasks.transcription.dispatch import QUEUE
from workers.app import configured_settings
from workers.recognizers import RecognizerConfigError, build_recognizer, pool_processes
from workers.recognizers.whisper_backend import WhisperRecognizer

log = logging.getLogger(__name__)


@signals.worker_init.connect
def _check_recognizer_at_start(sender: Any = None, **_: Any) -> None:
    """A worker that consumes the transcription queue builds its recogniser once before it
    starts: a misconfigured backend stops it with the reason, instead of failing every call."""
    try:
        queues = sender.app.amqp.queues.consume_from
    except AttributeError:
        return
    if QUEUE not in queues:
        return
    settings = configured_settings()
    try:
        recognizer = build_recognizer(
            settings.transcription, pool_processes=pool_processes(settings.pools)
        )
        if isinstance(recognizer, WhisperRecognizer):
            # A model given by name is fetched here, once, not loaded: each pool process loads
            # its own after the fork.
            recognizer.fetch_named_model()
    except RecognizerConfigError as exc:
        raise SystemExit(
            f"bcfy: cannot start: TRANSCRIBE_BACKEND={settings.transcription.backend}: {exc}"
        ) from None
    log.info("transcription: recogniser %s (%s) ready", recognizer.backend, recognizer.model)
