"""Healthchecks for containers: is beat ticking, does a worker answer, are Flower and the
metrics endpoint serving."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from workers.core.settings import Settings


def check(what: str, arg: str | None, settings: Settings) -> tuple[bool, str]:
    if what == "beat":
        return _beat(settings)
    if what == "worker":
        return _worker(arg or "ingest", settings)
    if what == "metrics":
        return _http_ok(
            f"http://127.0.0.1:{int(arg or settings.operations.metrics_port)}/metrics", "metrics"
        )
    return _http_ok(f"http://127.0.0.1:{int(arg or 5555)}/healthcheck", "flower")


def _beat(settings: Settings) -> tuple[bool, str]:
    """Beat rewrites its schedule file after every tick (beat_sync_every=1)."""
    files = list(Path(settings.services.state_dir).glob("celerybeat-schedule*"))
    if not files:
        return False, f"no beat schedule file in {settings.services.state_dir}"
    age = time.time() - max(f.stat().st_mtime for f in files)
    shortest = min(
        settings.jobs.ingest_interval_sec,
        settings.jobs.audio_worker_interval_sec,
        settings.jobs.transcription_dispatch_interval_sec,
    )
    limit = 3 * shortest + 30
    return age <= limit, f"beat last ticked {age:.0f}s ago (limit {limit:.0f}s)"


def _worker(queue: str, settings: Settings) -> tuple[bool, str]:
    from workers.app import app, configure

    configure(settings)
    node = f"{queue}@{socket.gethostname()}"
    replies = app.control.ping(destination=[node], timeout=5.0) or []
    if any(node in reply for reply in replies):
        return True, f"{node} answered"
    return False, f"{node} did not answer a ping within 5s"


def _http_ok(url: str, what: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200, f"{what} answered {resp.status}"
    except urllib.error.HTTPError as exc:
        # 401: up, behind basic auth.
        return exc.code == 401, f"{what} answered {exc.code}"
    except OSError as exc:
        return False, f"{what} unreachable: {exc}"
