"""The audio store's start-up check, connected to Celery's `worker_init` signal: a worker whose
queues use the store (audio writes it, transcription reads it, ingest's maintenance deletes from
it) refuses to start when the bucket is missing, the credentials are refused or the directory
cannot be written, naming the setting, instead of failing every call."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from workers.app import configured_settings
from workers.audio.store import uses_object_store
from workers.audio.store.check import check_store

log = logging.getLogger(__name__)

# Queue -> whether its tasks write to the store.
STORE_QUEUES = {"audio": True, "ingest": True, "transcription": False}


@signals.worker_init.connect
def _check_store_at_start(sender: Any = None, **_: Any) -> None:
    try:
        queues = set(sender.app.amqp.queues.consume_from)
    except AttributeError:
        return
    used = queues & set(STORE_QUEUES)
    if not used:
        return
    settings = configured_settings()
    if not uses_object_store(settings.audio) and "audio" not in used:
        return  # a shared directory: the audio pool's own check covers it
    problem = check_store(settings, write=any(STORE_QUEUES[q] for q in used))
    if problem:
        raise SystemExit(f"bcfy: cannot start: {problem}")
    where = settings.audio.store_url or settings.audio.store_dir
    log.info("audio store %s ready", where)
