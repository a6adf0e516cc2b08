"""The pipeline's processes and their command lines: one definition, used by `bcfy worker`,
`bcfy beat`, `bcfy flower`, `bcfy run`, the Makefile and compose.yaml.
"""

from __future__ import annotations

import os
import sys

from workers.settings import Settings


def _celery(*args: str) -> list[str]:
    """`celery -A workers.app ARGS` with this interpreter (the venv's celery, whatever PATH)."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", *args]


def worker_argv(queue: str, settings: Settings, extra: list[str] | None = None) -> list[str]:
    """`celery worker` for one queue's pool, with the pool type and size from settings."""
    pool, concurrency = {
        "ingest": (settings.ingest_pool, settings.ingest_concurrency),
        "audio": (settings.audio_pool, settings.audio_concurrency),
        "transcription": (settings.transcription_pool, settings.transcription_concurrency),
    }[queue]
    if concurrency == 0:
        concurrency = os.cpu_count() or 1
    return _celery(
        "worker",
        "--queues",
        queue,
        "--hostname",
        f"{queue}@%h",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        settings.log_level,
        *(extra or []),
    )


def beat_argv(settings: Settings, extra: list[str] | None = None) -> list[str]:
    return _celery("beat", "--loglevel", settings.log_level, *(extra or []))


def flower_argv(settings: Settings, port: int, extra: list[str] | None = None) -> list[str]:
    # Flower reads FLOWER_BASIC_AUTH from the environment itself: the secret stays out of argv,
    # where `ps` would show it.
    return _celery("flower", f"--port={port}", *(extra or []))
