"""A call whose processing kills its pool process (the OOM killer, a crash in a decoder) with real
audio workers: the worker puts the task back at once (late acks, task_reject_on_worker_lost),
and each death counts as an attempt, so after AUDIO_MAX_ATTEMPTS deaths the call fails as
`worker_lost`, while the other calls of its task are prepared."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.audio import (
    assert_stored_files_match,
    attempt_rows,
    audio_rows,
    make_env,
    start_audio,
    states,
)
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.dev.calls import HeldAudio, publish
from workers.dev.procs import Proc, run_cli, wait_until

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
    db, worker: Proc, call_id: int, holds: list[HeldAudio], killed: list[int]
) -> None:
    """SIGKILL the pool child downloading the call (never the worker's main process)."""
    pid = wait_until(lambda: process_on(db, call_id, killed), 30, "the attempt's process")
    assert pid != worker.pid and parent_of(pid) == worker.pid, "a pool child of the worker"
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    for held in holds:
        held.release_all()  # the server's threads answer into closed connections


def kill_it_each_time_it_downloads(
    db,
    worker: Proc,
    call_id: int,
    held: HeldAudio,
    most: int,
    first_kill: Callable[[], None],
    also_held: tuple[HeldAudio, ...] = (),
) -> int:
    """Kill the pool process each time it downloads the call (once `first_kill` returns, the
    first time), until the call fails; never more than `most` times. Returns the kills."""
    killed: list[int] = []
    while True:

        def next_event() -> str | None:
            if audio_rows(db)[call_id]["state"] == "failed":
                return "failed"
            if held.arrived > len(killed):
                return "downloading"
            return None

        event = wait_until(next_event, 90, "the call downloaded again or failed")
        if event == "failed":
            return len(killed)
        assert len(killed) < most, (
            f"downloaded again after {len(killed)} deaths; attempts recorded:"
            f" {attempt_rows(db, call_id)}"
        )
        if not killed:
            first_kill()
        kill_the_pool_process_on_it(db, worker, call_id, [held, *also_held], killed)


def start_audio_worker(clean, procs, client, sim, tmp_path) -> tuple[Proc, dict]:
    """One audio worker, one pool process; one claim pass. A task holds up to eight calls
    (2 x AUDIO_DOWNLOAD_CONCURRENCY); the lease (120 s by default) never runs out here: every
    retry comes from the worker putting the task back."""
    env = make_env(
        clean,
        tmp_path,
        sim,
        AUDIO_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        AUDIO_DOWNLOAD_CONCURRENCY="4",
    )
    worker = start_audio(procs, env, tmp_path, concurrency=1)
    client.send_task(CLAIM_JOB, queue="audio")
    return worker, env


def assert_failed_as_worker_lost(db, call_id: int) -> None:
    row = audio_rows(db)[call_id]
    assert (row["state"], row["error_code"], row["attempts"]) == (
        "failed",
        "worker_lost",
        MAX_ATTEMPTS,
    ), row
    assert "died during attempt 3 of 3" in row["last_error"], row["last_error"]
    assert "no attempts left" in row["last_error"], row["last_error"]


def test_a_call_that_kills_its_pool_process_fails_as_worker_lost_and_the_rest_are_ready(
    db, clean, procs, client, sim, tmp_path
):
    playlist = sim.add_playlist()
    poison, record = publish(sim, db, playlist)
    others = [publish(sim, db, playlist)[0] for _ in range(5)]
    held = HeldAudio(sim, record["url"])
    worker, env = start_audio_worker(clean, procs, client, sim, tmp_path)

    def others_ready() -> None:  # they finish while the call is held: it dies alone
        wait_until(lambda: states(db).get("ready") == len(others), 60, "the others ready")

    deaths = kill_it_each_time_it_downloads(db, worker, poison, held, MAX_ATTEMPTS, others_ready)

    assert deaths == MAX_ATTEMPTS
    assert_failed_as_worker_lost(db, poison)
    assert held.arrived == MAX_ATTEMPTS, "downloaded once per attempt"
    assert attempt_rows(db, poison) == [
        (n, "worker_lost", "worker_lost") for n in range(1, MAX_ATTEMPTS + 1)
    ]
    assert worker.alive(), "only pool processes died"
    assert states(db) == {"ready": len(others), "failed": 1}
    # The take-over that failed the call removes its temporary files right after that commit.
    store = FilesystemAudioStore(tmp_path / "store")
    wait_until(lambda: store.work.temp_files() == [], 60, "the dead call's temporary files removed")
    assert assert_stored_files_match(db, tmp_path / "store") == len(others)
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "worker_lost" in status.stdout, status.stdout


def test_a_death_with_several_calls_under_way_counts_against_none_of_them(
    db, clean, procs, client, sim, tmp_path
):
    """The first death takes three calls mid-download: which one killed the process cannot be
    told, so it counts against none, and the task is worked one call at a time from then on.
    The call that kills the process then dies alone each time and fails after
    AUDIO_MAX_ATTEMPTS deaths; the two that were only under way are prepared at their first
    attempt."""
    playlist = sim.add_playlist()
    poison, record = publish(sim, db, playlist)
    bystanders = dict(publish(sim, db, playlist) for _ in range(2))
    others = [publish(sim, db, playlist)[0] for _ in range(3)]
    held = HeldAudio(sim, record["url"])
    held_once = [HeldAudio(sim, r["url"], times=1) for r in bystanders.values()]
    worker, _ = start_audio_worker(clean, procs, client, sim, tmp_path)

    def all_three_under_way() -> None:
        wait_until(lambda: all(h.arrived for h in held_once), 60, "the bystanders downloading")
        wait_until(lambda: states(db).get("ready") == len(others), 60, "the others ready")
        pid = process_on(db, poison, [])
        assert all(process_on(db, b, []) == pid for b in bystanders), "one process on all three"

    deaths = kill_it_each_time_it_downloads(
        db, worker, poison, held, MAX_ATTEMPTS + 1, all_three_under_way, tuple(held_once)
    )

    assert deaths == MAX_ATTEMPTS + 1, "the first death did not count"
    assert_failed_as_worker_lost(db, poison)
    assert held.arrived == MAX_ATTEMPTS + 1
    poison_attempts = attempt_rows(db, poison)
    assert [(n, outcome) for n, outcome, _ in poison_attempts] == [
        (1, "worker_lost"),
        *((n, "worker_lost") for n in range(1, MAX_ATTEMPTS + 1)),
    ]
    wait_until(lambda: states(db).get("ready") == len(others) + 2, 60, "the bystanders ready")
    rows = audio_rows(db)
    for call_id in bystanders:
        assert rows[call_id]["attempts"] == 1, "a shared death is not counted"
        assert [(n, outcome) for n, outcome, _ in attempt_rows(db, call_id)] == [
            (1, "worker_lost"),
            (1, "ready"),
        ]
    assert all(h.arrived == 2 for h in held_once), "each bystander downloaded again once"
    lost = db.execute(
        "SELECT error FROM call_audio_attempts WHERE call_id = %s ORDER BY id LIMIT 1",
        (poison,),
    ).fetchone()
    assert "died while working on 3 calls: not counted" in lost[0], lost
    assert worker.alive()
    assert assert_stored_files_match(db, tmp_path / "store") == len(others) + 2
