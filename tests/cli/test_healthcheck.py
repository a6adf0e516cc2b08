"""`bcfy healthcheck beat|worker QUEUE|metrics PORT`, as compose runs it: exit 0 while the
process is up and doing its job, non-zero with a reason when it is not. (Flower's is in
tests/cli/test_operations.py.)"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Services
from workers.dev.procs import Proc, run_cli, wait_until
from workers.dev.services import free_port

pytestmark = pytest.mark.slow


def healthcheck(env: dict[str, str], *args: str) -> tuple[int, str]:
    out = run_cli("healthcheck", *args, env=env)
    return out.returncode, out.stdout.strip() + out.stderr.strip()


def bcfy(name: str, env: dict[str, str], tmp_path: Path, *args: str) -> Proc:
    return Proc(name, [sys.executable, "-m", "workers.cli", *args], env, tmp_path)


def test_worker_healthcheck(clean: Services, tmp_path: Path, procs: list[Proc]):
    env = clean.worker_env(tmp_path, INGEST_CONCURRENCY="1")
    host = socket.gethostname()
    assert healthcheck(env, "worker", "ingest") == (
        1,
        f"ingest@{host} did not answer a ping within 5s",
    )

    worker = bcfy("ingest", env, tmp_path, "worker", "ingest", "--without-mingle")
    procs.append(worker)
    worker.started("ready.")
    assert healthcheck(env, "worker", "ingest") == (0, f"ingest@{host} answered")
    code, message = healthcheck(env, "worker", "audio")
    assert code == 1, "an ingest worker does not make the audio pool healthy"
    assert message == f"audio@{host} did not answer a ping within 5s"

    worker.stop()
    assert worker.popen.returncode == 0
    assert healthcheck(env, "worker", "ingest") == (
        1,
        f"ingest@{host} did not answer a ping within 5s",
    )


def _age_schedule(state: Path, seconds: float) -> None:
    """Make beat's schedule files look `seconds` old, as if it had stopped ticking then."""
    when = time.time() - seconds
    for f in state.glob("celerybeat-schedule*"):
        os.utime(f, (when, when))


def test_beat_healthcheck(clean: Services, tmp_path: Path, procs: list[Proc]):
    # Limit: 3 x the shortest interval + 30 s = 36 s.
    env = clean.worker_env(
        tmp_path,
        INGEST_INTERVAL_SEC="6",
        AUDIO_WORKER_INTERVAL_SEC="2",
        TRANSCRIPTION_DISPATCH_INTERVAL_SEC="2",
    )
    state = Path(env["BCFY_STATE_DIR"])
    code, message = healthcheck(env, "beat")
    assert (code, message) == (1, f"no beat schedule file in {state}")

    beat = bcfy("beat", env, tmp_path, "beat")
    procs.append(beat)
    beat.started("beat: Starting...")
    wait_until(lambda: healthcheck(env, "beat")[0] == 0, 60, "beat healthy once it ticks")

    # A running beat keeps its schedule fresh: made to look 1000 s old, it is rewritten at the
    # next tick.
    _age_schedule(state, 1000)
    wait_until(lambda: healthcheck(env, "beat")[0] == 0, 60, "beat's next tick")

    beat.stop()
    # Stopped, nothing rewrites it: healthy while the last tick is within the limit, then not.
    _age_schedule(state, 20)
    code, message = healthcheck(env, "beat")
    assert code == 0 and re.fullmatch(r"beat last ticked 2\ds ago \(limit 36s\)", message), message
    _age_schedule(state, 1000)
    code, message = healthcheck(env, "beat")
    assert code == 1 and re.fullmatch(r"beat last ticked 10\d\ds ago \(limit 36s\)", message), (
        message
    )
    client = clean.redis()
    client.delete("ingest", "audio", "transcription")  # the ticks it sent; no worker ran
    client.close()


def test_metrics_healthcheck(clean: Services, tmp_path: Path, procs: list[Proc]):
    env = clean.worker_env(tmp_path)
    port = str(free_port())
    code, message = healthcheck(env, "metrics", port)
    assert code == 1 and message.startswith("metrics unreachable:"), message

    metrics = bcfy("metrics", env, tmp_path, "metrics", "--port", port)
    procs.append(metrics)
    metrics.started("metrics on http://")
    assert healthcheck(env, "metrics", port) == (0, "metrics answered 200")

    metrics.stop()
    code, message = healthcheck(env, "metrics", port)
    assert code == 1 and message.startswith("metrics unreachable:"), message
