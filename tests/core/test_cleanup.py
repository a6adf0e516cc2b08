"""Nothing the suite or a bench starts outlives it: not on success, and not when it is
interrupted by SIGTERM (as `timeout` and CI send), Ctrl-C, or even SIGKILL. Each run here
marks its environment, and every process that inherits the mark is looked for afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, Services
from tests.support.procs import pytest_argv
from workers.dev.procs import wait_until

pytestmark = pytest.mark.slow

MARK = "BCFY_CLEANUP_MARK"


def marked_processes(mark: str) -> dict[int, str]:
    """pid -> command line of the live processes whose environment carries the mark."""
    found: dict[int, str] = {}
    needle = f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def databases(services: Services, prefix: str) -> set[str]:
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
        ).fetchall()
    return {name for (name,) in rows}


def run_marked(argv: list[str], services: Services, tmp_path: Path, **env: str) -> tuple:
    mark = uuid.uuid4().hex
    full_env = {
        **os.environ,
        # The servers this session uses; the run makes its own database and Redis index.
        "DATABASE_URL": services.admin_dsn,
        "REDIS_URL": services.redis_url,
        MARK: mark,
        **env,
    }
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return proc, mark, log


def start_probe(services: Services, tmp_path: Path) -> tuple:
    report = tmp_path / "probe.report"
    proc, mark, log = run_marked(
        pytest_argv("-o", "addopts=", "tests/probes/hold_a_worker.py"),
        services,
        tmp_path,
        BCFY_PROBE_REPORT=str(report),
    )
    try:
        wait_until(lambda: report.exists() or proc.poll() is not None, 180, "the probe's worker")
    except BaseException:
        proc.kill()
        raise
    assert report.exists(), (tmp_path / "run.log").read_text()
    worker_pid, database_url = report.read_text().split()
    return proc, mark, log, int(worker_pid), database_url.rsplit("/", 1)[1]


def finish(proc: subprocess.Popen, mark: str, log) -> dict[int, str]:
    """Wait for the run to end and for whatever it started to be gone; returns what is left
    (and kills it, so a failing test leaves nothing either)."""
    try:
        proc.wait(180)
    finally:
        log.close()
    try:
        wait_until(lambda: not marked_processes(mark), 60, "the run's processes to end")
    except AssertionError:
        pass
    left = marked_processes(mark)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_suite_stops_its_workers_and_drops_its_database(
    services: Services, tmp_path: Path, sig: int
) -> None:
    proc, mark, log, worker_pid, database = start_probe(services, tmp_path)
    running = marked_processes(mark)
    assert worker_pid in running  # the worker and its pool process, under the inner pytest
    assert len(running) >= 3, running
    assert database in databases(services, "bcfy_test")

    proc.send_signal(sig)
    left = finish(proc, mark, log)

    assert left == {}, f"left running: {left}\n{(tmp_path / 'run.log').read_text()[-3000:]}"
    assert database not in databases(services, "bcfy_test")


def test_a_killed_suite_still_takes_its_workers_with_it(services: Services, tmp_path: Path) -> None:
    """SIGKILL runs no clean-up at all: the workers get SIGTERM from the kernel as their parent
    dies (PR_SET_PDEATHSIG) and shut down. (The database stays: nothing can drop it then.)"""
    proc, mark, log, worker_pid, database = start_probe(services, tmp_path)
    assert worker_pid in marked_processes(mark)

    proc.kill()
    left = finish(proc, mark, log)

    assert left == {}, f"left running: {left}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_a_bench_stopped_by_sigterm_leaves_nothing_running(
    services: Services, tmp_path: Path
) -> None:
    """As `timeout 60 python bench/audio.py` would: SIGTERM while its workers run."""
    before = databases(services, "bcfy_bench")
    proc, mark, log = run_marked(
        [sys.executable, "bench/audio.py", "--no-memory", "--calls", "5", "--rounds", "50"],
        services,
        tmp_path,
    )

    def worker_running() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "run.log").read_text()[-3000:])
        return any(" worker " in cmd for cmd in marked_processes(mark).values())

    try:
        wait_until(worker_running, 180, "the bench's first worker")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    left = finish(proc, mark, log)

    assert left == {}, f"left running: {left}\n{(tmp_path / 'run.log').read_text()[-3000:]}"
    assert proc.returncode != 0  # it says it was interrupted, and keeps no results
    assert databases(services, "bcfy_bench") == before
