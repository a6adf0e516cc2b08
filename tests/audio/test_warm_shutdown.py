"""Warm shutdown of an audio worker mid-task (SIGTERM, as `docker stop` sends): it finishes the
calls it is working on, hands back the tasks it had not started, and exits 0; a later worker
prepares the rest. Every call ends ready once, downloaded once, nothing lost."""

from __future__ import annotations

import signal

import pytest

from tests.support.audio import (
    add_calls,
    assert_stored_files_match,
    attempts,
    make_env,
    start_audio,
    states,
)
from workers.dev.calls import HeldAudio
from workers.dev.procs import wait_until

pytestmark = pytest.mark.slow

CLAIM_JOB = "tasks.audio.process_pending_audio"
CALLS = 6


def test_sigterm_mid_task_finishes_the_calls_in_hand_and_hands_back_the_rest(
    db, clean, procs, client, sim, tmp_path
):
    calls = add_calls(db, sim, CALLS)
    # The first call of the first task is held at the server until SIGTERM has been sent.
    first_call = min(calls)
    held = HeldAudio(sim, calls[first_call]["url"], times=1)
    # Two calls per task: three tasks, one running, the others reserved or queued.
    env = make_env(
        clean,
        tmp_path,
        sim,
        AUDIO_WORKER_BATCH_SIZE=str(CALLS),
        AUDIO_DOWNLOAD_CONCURRENCY="1",
        AUDIO_LEASE_SEC="600",  # a call handed back is taken up at once, not after its lease
    )
    first = start_audio(procs, env, tmp_path, concurrency=1)
    client.send_task(CLAIM_JOB, queue="audio")
    wait_until(lambda: held.arrived, 60, "a download in flight")

    first.popen.send_signal(signal.SIGTERM)
    first.wait_for_log("Warm shutdown")
    held.release_all()
    assert first.popen.wait(60) == 0, first.log()[-3000:]

    rows = dict(db.execute("SELECT call_id, state FROM call_audio").fetchall())
    done_by_first = {call_id for call_id, state in rows.items() if state == "ready"}
    assert first_call in done_by_first, "the call it was downloading was finished"
    assert len(done_by_first) < CALLS, "it took no new work after SIGTERM"

    start_audio(procs, env, tmp_path, "a2", concurrency=1)
    wait_until(lambda: states(db) == {"ready": CALLS}, 120, "every call ready")

    per_call: dict[int, list[str]] = {}
    for call_id, _, _worker, outcome in attempts(db):
        per_call.setdefault(call_id, []).append(outcome)
    assert per_call == {call_id: ["ready"] for call_id in calls}, "each call prepared once"
    assert held.arrived == 1 and sim.requests["audio"] == CALLS, "each file downloaded once"
    assert assert_stored_files_match(db, tmp_path / "store") == CALLS
