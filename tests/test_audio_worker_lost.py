"""A call whose processing kills its pool process (the OOM killer, a crash in a decoder) with real
audio workers: the worker puts the task back at once (late acks, task_reject_on_worker_lost),
and each death counts as an attempt, so after AUDIO_MAX_ATTEMPTS deaths the call fails as
`worker_lost`, while the other calls of its task are prepared."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.audio_helpers import (
    HeldAudio,
    assert_stored_files_match,
    audio_rows,
    make_env,
    publish,
    states,
)
from tests.procs import Proc, run_cli, start_worker, wait_until

pytestmark = pytest.mark.slow

CLAIM_JOB = "tasks.audio.process_pending_audio"
MAX_ATTEMPTS = 3


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_on(db, call_id: int, spared: list[int]) -> int:
    """The pid of the process with an unfinished attempt on the call (none killed yet), or 0."""
    rows = db.execute(
        "SELECT worker FROM call_audio_attempts WHERE call_id = %s AND ended_at IS NULL"
        " ORDER BY id DESC",
        (call_id,),
    ).fetchall()
    pids = [int(w.rsplit(":", 1)[1]) for (w,) in rows]
    return next((p for p in pids if p not in spared), 0)


def kill_the_pool_process_on_it(
    db, worker: Proc, call_id: int, held: HeldAudio, killed: list[int]
) -> None:
    """SIGKILL the pool child downloading the call (never the worker's main process)."""
    pid = wait_until(lambda: process_on(db, call_id, killed), 30, "the attempt's process")
    assert pid != worker.pid and parent_of(pid) == worker.pid, "a pool child of the worker"
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    held.release_all()  # the server's thread answers into the closed connection


def attempt_rows(db, call_id: int) -> list[tuple]:
    return db.execute(
        "SELECT attempt, outcome, error_code FROM call_audio_attempts WHERE call_id = %s"
        " ORDER BY id",
        (call_id,),
    ).fetchall()


def test_a_call_that_kills_its_pool_process_fails_as_worker_lost_and_the_rest_are_ready(
    db, clean, procs, client, sim, tmp_path
):
    playlist = sim.add_playlist()
    poison, record = publish(sim, db, playlist)
    others = [publish(sim, db, playlist)[0] for _ in range(5)]
    held = HeldAudio(sim, record["url"])
    # One task holds all six calls (2 x AUDIO_DOWNLOAD_CONCURRENCY); the lease (120 s by
    # default) never runs out here: every retry comes from the worker putting the task back.
    env = make_env(clean, tmp_path, sim, AUDIO_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    worker = start_worker("a1", env, tmp_path, queues="audio", concurrency=1)
    procs.append(worker)
    client.send_task(CLAIM_JOB, queue="audio")

    killed: list[int] = []
    while True:

        def next_event() -> str | None:
            if audio_rows(db)[poison]["state"] == "failed":
                return "failed"
            if held.arrived > len(killed):
                return "downloading"
            return None

        event = wait_until(next_event, 90, "the call downloaded again or failed")
        if event == "failed":
            break
        assert len(killed) < MAX_ATTEMPTS, (
            f"downloaded again after {len(killed)} deaths; attempts recorded:"
            f" {attempt_rows(db, poison)}"
        )
        if not killed:  # the others finish while the call is held: it dies alone
            wait_until(lambda: states(db).get("ready") == len(others), 60, "the others ready")
        kill_the_pool_process_on_it(db, worker, poison, held, killed)

    row = audio_rows(db)[poison]
    assert (row["state"], row["error_code"], row["attempts"]) == (
        "failed",
        "worker_lost",
        MAX_ATTEMPTS,
    ), row
    assert "died" in row["last_error"], row["last_error"]
    assert held.arrived == MAX_ATTEMPTS, "downloaded once per attempt"
    assert attempt_rows(db, poison) == [
        (n, "worker_lost", "worker_lost") for n in range(1, MAX_ATTEMPTS + 1)
    ]
    assert worker.alive(), "only pool processes died"
    assert states(db) == {"ready": len(others), "failed": 1}
    assert assert_stored_files_match(db, tmp_path / "store") == len(others)
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "worker_lost" in status.stdout, status.stdout
