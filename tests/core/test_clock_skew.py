"""Clock skew between hosts: a worker whose clock is off still runs beat's ticks, a tick that
truly waited too long is still dropped, and `bcfy status` shows each worker's offset.

The skewed worker is the real `celery worker` started under libfaketime (`faketime -f +120s`):
every clock call in it and its pool children is shifted, as on a host whose clock is wrong.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Services
from tests.support.procs import stale_ticks, start_beat, start_worker
from workers.dev.procs import run_cli, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("faketime") is None,
        reason="SKIPPED: faketime is not installed (apt-get install faketime); the clock-skew "
        "tests need it to run a worker whose clock is shifted",
    ),
]

INGEST = "tasks.ingest.poll_followed_playlists"
SLEEPER = "tests.jobs.sleeper"
SKEW_SEC = 120
GRACE_SEC = 30


def shifted(seconds: int) -> list[str]:
    """A command prefix running a process with its clock `seconds` off the real one."""
    return ["faketime", "-f", f"{seconds:+d}s"]


@pytest.fixture
def env(clean: Services, tmp_path: Path) -> dict[str, str]:
    return clean.worker_env(
        tmp_path,
        JOB_MISFIRE_GRACE_SEC=str(GRACE_SEC),
        INGEST_INTERVAL_SEC="1",
        INGEST_MIN_POLL_GAP_SEC="0",
        AUDIO_WORKER_INTERVAL_SEC="3600",
        TRANSCRIPTION_DISPATCH_INTERVAL_SEC="3600",
        GEO_REFRESH_INTERVAL_SEC="86400",
    )


@pytest.fixture
def stop_grace() -> float:
    return 3


def test_faketime_shifts_the_clock_of_a_python_process() -> None:
    """The premise of the tests below: faketime works on this Python."""
    import subprocess
    import sys

    before = time.time()
    out = subprocess.run(
        [*shifted(SKEW_SEC), sys.executable, "-c", "import time; print(time.time())"],
        capture_output=True,
        text=True,
        check=True,
    )
    after = time.time()
    # Whenever it ran, between `before` and `after`, its clock read SKEW_SEC ahead.
    assert before + SKEW_SEC - 1 <= float(out.stdout) <= after + SKEW_SEC + 1


@pytest.mark.parametrize("skew", [SKEW_SEC, -SKEW_SEC], ids=["ahead", "behind"])
def test_a_worker_whose_clock_is_off_runs_every_tick_and_status_shows_its_offset(
    env, procs, tmp_path, clean, skew
):
    with clean.db() as conn:  # no playlists left by other tests: each run is then "ok"
        conn.execute("TRUNCATE bcfy_playlists CASCADE")
    # Beat on this host's clock, the worker `skew` seconds off: more than the grace either way.
    worker = start_worker("skewed", env, tmp_path, concurrency=2, prefix=shifted(skew))
    procs.append(worker)
    procs.append(start_beat("beat", env, tmp_path, app="workers.app"))
    wait_until(lambda: len(clean.job_runs(INGEST, "ok")) >= 3, 120, "three ingest runs")
    assert "tick expired" not in worker.log()

    env_cli = {**env, "PATH": "/usr/bin:/bin"}
    status = json.loads(run_cli("status", "--json", env=env_cli).stdout)
    (clock,) = [c for node, c in status["clocks"].items() if node.startswith("skewed@")]
    assert abs(clock["offset_sec"] - skew) < 5, clock
    text = run_cli("status", env=env_cli).stdout
    ahead_or_behind = "ahead of" if skew > 0 else "behind"
    assert "worker skewed@" in text
    warning = [line for line in text.splitlines() if line.startswith("! clock:")]
    assert len(warning) == 1 and ahead_or_behind in warning[0], text
    assert "JOB_MISFIRE_GRACE_SEC" in warning[0]
    # The worker says so itself, at start.
    worker.wait_for_log("clock is", timeout=30)


def test_a_tick_that_waited_longer_than_the_grace_is_dropped_by_a_worker_behind(
    env, procs, tmp_path, clean
):
    # Ticks wait with no worker for longer than their grace, then a worker whose clock is
    # behind comes up: by its own clock they would still look fresh; they are stale.
    env |= {"TEST_BEAT_JOBS": "sleeper:0.5", "JOB_MISFIRE_GRACE_SEC": "1"}
    queued = stale_ticks(env, tmp_path, procs, clean.redis(), 4)
    worker = start_worker("behind", env, tmp_path, prefix=shifted(-SKEW_SEC))
    procs.append(worker)
    wait_until(
        lambda: worker.log().count("tick expired in the queue") == queued,
        30,
        f"all {queued} stale ticks to be dropped",
    )
    assert clean.job_runs(SLEEPER) == [], "stale ticks must not run late"
