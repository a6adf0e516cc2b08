"""The scheduler's promises that need real prefork workers to show: Celery's hard time limit
actually reached by a body that ignores the soft one; each pool process's own database pool,
made after the fork; and no database connection held across an HTTP call (the audio stage's
downloads; the transcription stage's is in tests/transcription/test_promises.py)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from beat_schedule import tick_headers
from tests.conftest import Services
from tests.support.audio import add_calls, attempts, audio_rows, make_env, start_audio, states
from tests.support.env import ONE_DB_CONNECTION, http_timeouts
from tests.support.procs import start_worker
from workers.core.clock import redis_time_ms
from workers.core.locks import holder_of
from workers.dev.calls import HeldAudio
from workers.dev.procs import Proc, wait_until

pytestmark = pytest.mark.slow

STUBBORN = "tests.jobs.stubborn"
WHOAMI = "tests.jobs.whoami"
CLAIM_JOB = "tasks.audio.process_pending_audio"


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """tests/core/conftest.py's, its ticks stale after 60 s."""
    return env | {"JOB_MISFIRE_GRACE_SEC": "60"}


def notes(r: redis.Redis, key: str) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in r.lrange(key, 0, -1)]


def send_tick(client, r: redis.Redis, task: str) -> None:
    """A beat tick, stamped now by Redis's clock (interval 1 s: each tick its own slot)."""
    client.send_task(task, queue="ingest", headers=tick_headers(1.0, 60.0, redis_time_ms(r)))


def test_a_body_that_ignores_the_soft_limit_is_killed_at_the_hard_limit_and_the_next_tick_runs(
    env, procs, tmp_path, clean, client
):
    # The asyncio deadline at 1 s cannot fire in a blocked loop; Celery's soft limit (2.5 s)
    # is shrugged off; the hard limit (4 s) kills the pool process.
    env |= {"JOB_SOFT_TIME_LIMIT_SEC": "1", "JOB_TIME_LIMIT_SEC": "4"}
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    r = clean.redis()
    r.rpush("test:block", "600")  # far past every limit: only a kill ends it
    send_tick(client, r, STUBBORN)
    wait_until(lambda: notes(r, "test:starts"), 20, "the stuck run to start")

    worker.wait_for_log(f"Hard time limit (4.0s) exceeded for {STUBBORN}", timeout=60)
    assert notes(r, "test:soft"), "the body saw Celery's soft limit and went on"
    assert notes(r, "test:ends") == []
    (killed,) = wait_until(lambda: clean.job_runs(STUBBORN, "error"), 30, "the killed run")
    assert "hard time limit (4s) reached" in killed.error
    assert killed.worker.startswith("w1@")
    wait_until(lambda: holder_of(r, STUBBORN) is None, 30, "the lock released or expired")
    assert worker.alive(), "the worker replaces its killed pool process and goes on"

    send_tick(client, r, STUBBORN)  # the next tick
    (ok,) = wait_until(lambda: clean.job_runs(STUBBORN, "ok"), 30, "the next tick's run")
    assert ok.started_at > killed.started_at
    assert len(notes(r, "test:ends")) == 1
    assert [x.outcome for x in clean.job_runs(STUBBORN)] == ["error", "ok"]


def runs_of(services: Services, task: str) -> list[str]:
    """The outcomes of a job's runs, whatever their arguments (a lock and a name per set)."""
    with services.db() as conn:
        rows = conn.execute(
            "SELECT outcome FROM job_runs WHERE job LIKE %s ORDER BY id", (f"{task}:%",)
        ).fetchall()
    return [outcome for (outcome,) in rows]


def pool_children(worker: Proc) -> list[int]:
    """The pids of the worker's prefork pool processes."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == worker.pid:  # ppid
                children.append(int(entry))
    return sorted(children)


def postgres_sockets(database_url: str) -> set[int]:
    """The inodes of this machine's TCP sockets connected to the database server's port."""
    port = urlsplit(database_url).port or 5432
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":  # 01: ESTABLISHED
                found.add(int(fields[9]))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets a process has open."""
    found = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[len("socket:[") : -1]))
    return found


def test_each_pool_process_has_its_own_database_connections_made_after_the_fork(
    env, procs, tmp_path, clean, client
):
    assert urlsplit(clean.database_url).hostname, "the check reads TCP sockets"
    worker = start_worker("w1", env, tmp_path, concurrency=2)
    procs.append(worker)
    r = clean.redis()
    for n in (1, 2):  # two runs at once (a lock per argument set), one per pool process
        client.send_task(WHOAMI, queue="ingest", kwargs={"n": n})
    wait_until(lambda: len(runs_of(clean, WHOAMI)) == 2, 30, "both runs")
    assert runs_of(clean, WHOAMI) == ["ok", "ok"]

    seen = {
        int(pid): int(backend)
        for pid, backend in (note.split() for note in notes(r, "test:whoami"))
    }
    children = pool_children(worker)
    assert sorted(seen) == children, "each pool process ran one"
    assert len(set(seen.values())) == 2, f"one PostgreSQL backend per process: {seen}"
    with clean.db() as conn:
        backends = {
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            ).fetchall()
        }
    assert set(seen.values()) <= backends, "their connections stay open in their pools"

    # Whose sockets those connections are: each child's own; none in the worker's main process
    # (a pool made before the fork would be there, and shared by both children).
    pg = postgres_sockets(clean.database_url)
    held = {pid: socket_inodes(pid) & pg for pid in [worker.pid, *children]}
    assert held[worker.pid] == set(), "the main process holds no database connection"
    for child in children:
        assert held[child], f"pool process {child} has its own connection"
    first, second = (held[c] for c in children)
    assert not first & second, "no connection is shared between pool processes"


def test_no_connection_is_held_across_an_audio_download(db, clean, procs, client, sim, tmp_path):
    # One connection in the pool process's pool and two downloads at once in one task: while
    # the first call's download is held by the server, the second call is started, stored and
    # marked ready. It could not be if the held download kept the only connection.
    calls = add_calls(db, sim, 2)
    held_id, other_id = sorted(calls)
    held = HeldAudio(sim, calls[held_id]["url"])
    env = make_env(
        clean,
        tmp_path,
        sim,
        **ONE_DB_CONNECTION,
        **http_timeouts(600),
        AUDIO_DOWNLOAD_CONCURRENCY="2",
    )
    start_audio(procs, env, tmp_path, concurrency=1)
    try:
        client.send_task(CLAIM_JOB, queue="audio")
        wait_until(lambda: held.arrived, 30, "the first call's download to start")
        rows = wait_until(
            lambda: (r := audio_rows(db))[other_id]["state"] == "ready" and r,
            60,
            "the other call ready while the first download is held",
        )
        assert rows[held_id]["state"] == "downloading"
        assert held.arrived == 1, "the held download is the first and only one for its call"
    finally:
        held.release_all()
    wait_until(lambda: states(db) == {"ready": 2}, 60, "both calls ready")
    assert [a[3] for a in attempts(db)] == ["ready", "ready"], "each call prepared once"
