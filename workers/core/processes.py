"""The pipeline's processes and their command lines: one definition, used by `bcfy worker`,
`bcfy beat`, `bcfy flower`, `bcfy run`, the Makefile and compose.yaml.
"""

from __future__ import annotations

import os
import sys

from workers.core.settings import Settings, is_loopback_host


def _celery(*args: str) -> list[str]:
    """`celery -A workers.app ARGS` with this interpreter (the venv's celery, whatever PATH)."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", *args]


def worker_argv(queue: str, settings: Settings, extra: list[str] | None = None) -> list[str]:
    """`celery worker` for one queue's pool, with the pool type and size from settings."""
    pool, concurrency = {
        "ingest": (settings.pools.ingest_pool, settings.pools.ingest_concurrency),
        "audio": (settings.pools.audio_pool, settings.pools.audio_concurrency),
        "transcription": (
            settings.pools.transcription_pool,
            settings.pools.transcription_concurrency,
        ),
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
        settings.operations.log_level,
        *(extra or []),
    )


def beat_argv(settings: Settings, extra: list[str] | None = None) -> list[str]:
    return _celery("beat", "--loglevel", settings.operations.log_level, *(extra or []))


def flower_address(settings: Settings, extra: list[str] | None = None) -> tuple[str, list[str]]:
    """Where Flower will listen (an --address in `extra`, else FLOWER_ADDRESS), and `extra`
    without it."""
    address, rest = settings.operations.flower_address, []
    args = iter(extra or [])
    for arg in args:
        if arg == "--address":
            address = next(args, "")
        elif arg.startswith("--address="):
            address = arg.partition("=")[2]
        else:
            rest.append(arg)
    return address, rest


def flower_refusal(settings: Settings, extra: list[str] | None = None) -> str | None:
    """Why Flower must not start, or None. It can revoke tasks and shut workers down: without
    FLOWER_BASIC_AUTH it runs only in demo mode and only on loopback, where the person who
    started `bcfy run` on their own machine is the one who can reach it."""
    if settings.operations.flower_basic_auth:
        return None
    address, _ = flower_address(settings, extra)
    if not settings.operations.demo:
        return "set FLOWER_BASIC_AUTH=user:password (only demo mode on loopback runs without)"
    if not is_loopback_host(address):
        return (
            f"Flower would listen on {address or 'every interface'} with no login: set "
            "FLOWER_BASIC_AUTH=user:password, or listen on loopback (FLOWER_ADDRESS=127.0.0.1)"
        )
    return None


def flower_argv(settings: Settings, port: int, extra: list[str] | None = None) -> list[str]:
    # Flower reads FLOWER_BASIC_AUTH from the environment itself: the secret stays out of argv,
    # where `ps` would show it.
    address, rest = flower_address(settings, extra)
    return _celery("flower", f"--port={port}", f"--address={address}", *rest)
