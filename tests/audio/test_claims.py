"""Claiming, leases and outcomes on real PostgreSQL, in-process: the batch limit and the in-flight
cap, disjoint concurrent claims, leases that run out, and that only the lease holder writes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import psycopg

from tasks.audio.claims import ClaimedCall, fail_exhausted_leases, split_evenly
from tasks.audio.preparation import CallPreparer
from tests.support.audio import audio_rows, claim
from workers.audio.download import AudioFailure
from workers.core.backoff import backoff_sec
from workers.core.runtime import Runtime
from workers.core.settings import Settings, get_settings
from workers.dev.calls import insert_call


def settings(**overrides) -> Settings:
    return get_settings().with_values(**overrides)


def add_calls(db, n: int) -> list[int]:
    return [insert_call(db, f"http://x/{i}.m4a", 5.0) for i in range(n)]


def test_a_claim_takes_at_most_the_batch_and_stays_under_the_in_flight_cap(db, clean):
    ids = add_calls(db, 50)
    s = settings(AUDIO_WORKER_BATCH_SIZE=20, AUDIO_MAX_IN_FLIGHT=30)
    first = asyncio.run(claim(clean, s, "a"))
    assert first.call_ids == ids[:20] and first.full, "oldest first, the batch and no more"
    second = asyncio.run(claim(clean, s, "b"))
    assert len(second.call_ids) == 10, "30 in flight is the cap"
    at_cap = asyncio.run(claim(clean, s, "c"))
    assert (at_cap.call_ids, at_cap.room) == ([], 0), "no room: the cap is reached"
    rows = audio_rows(db)
    assert {r["lease_owner"] for r in rows.values() if r["state"] == "downloading"} == {"a", "b"}
    assert all(r["attempts"] == 1 for r in rows.values() if r["state"] == "downloading")


def test_a_pass_with_nothing_due_still_has_room(db, clean):
    # Told apart from "cap reached", which makes the next finished task ask for a pass.
    idle = asyncio.run(claim(clean, settings(AUDIO_WORKER_BATCH_SIZE=20), "a"))
    assert (idle.call_ids, idle.room, idle.full) == ([], 20, False)


def test_concurrent_claims_never_share_a_call(db, clean):
    add_calls(db, 30)
    s = settings(AUDIO_WORKER_BATCH_SIZE=20)

    async def both():
        return await asyncio.gather(claim(clean, s, "a", hold=0.5), claim(clean, s, "b", hold=0.5))

    a, b = asyncio.run(both())
    assert not set(a.call_ids) & set(b.call_ids)
    assert len(a.call_ids) + len(b.call_ids) == 30


def start(rt: Runtime, preparer: CallPreparer, call_id: int) -> ClaimedCall:
    """What a task does with a claimed call before downloading it: take it over, log the
    attempt."""
    (claimed,) = rt.run(preparer.take_over([call_id])).calls
    assert rt.run(preparer.start_attempt(claimed))
    return claimed


def test_a_lease_that_runs_out_is_claimed_again_and_a_dead_end_fails(db, clean):
    (call,) = add_calls(db, 1)
    s = settings(AUDIO_LEASE_SEC=0.3, AUDIO_MAX_ATTEMPTS=2)
    assert asyncio.run(claim(clean, s, "dead-1")).call_ids == [call]
    assert asyncio.run(claim(clean, s, "other")).call_ids == [], "the lease is live"
    time.sleep(0.4)
    assert asyncio.run(claim(clean, s, "dead-2")).call_ids == [call]
    assert audio_rows(db)[call]["attempts"] == 2
    time.sleep(0.4)

    async def sweep():
        async with await psycopg.AsyncConnection.connect(clean.database_url) as conn:
            return await fail_exhausted_leases(conn, s)

    assert asyncio.run(sweep()) == [call]
    row = audio_rows(db)[call]
    assert row["state"] == "failed" and row["error_code"] == "worker_lost"
    assert "the worker died during attempt 2 (lease of dead-2 ran out)" in row["last_error"]


def test_only_the_lease_holder_writes_an_outcome(db, clean):
    (call,) = add_calls(db, 1)
    s = settings(AUDIO_LEASE_SEC=0.3)
    asyncio.run(claim(clean, s, "old"))
    rt = Runtime.current()
    old = CallPreparer(s, rt.http, "old", "test:1")
    claimed = start(rt, old, call)  # still ours: the lease is renewed
    time.sleep(0.4)
    asyncio.run(claim(clean, s, "new"))  # presumed dead: claimed again
    outcome = rt.run(old.mark_failed(claimed, AudioFailure("http_404", "late news")))
    assert outcome == "lease_lost"
    row = audio_rows(db)[call]
    assert (row["state"], row["lease_owner"], row["error_code"]) == ("downloading", "new", None)
    assert rt.run(old.take_over([call])).calls == [], (
        "a redelivered task for the old claim skips it"
    )
    attempts = db.execute(
        "SELECT lease_owner, outcome FROM call_audio_attempts WHERE call_id = %s", (call,)
    ).fetchall()
    assert attempts == [("old", "lease_lost")]


def test_a_redelivered_task_counts_a_death_only_when_the_process_is_gone(db, clean):
    """The rule for a task delivered again under its claim (the pool process died, and the
    worker put the task back): a live process still on it makes the delivery a duplicate,
    dropped, nothing counted; a dead one counts against the one call it had under way."""
    first, second = add_calls(db, 2)
    s = settings(AUDIO_MAX_ATTEMPTS=2)
    rt = Runtime.current()
    asyncio.run(claim(clean, s, "o"))
    host = socket.gethostname()
    with subprocess.Popen(["sleep", "60"]) as live:
        with subprocess.Popen(["true"]) as gone:
            gone.wait()
        on_it = CallPreparer(s, rt.http, "o", f"a1@{host}:{live.pid}")
        start(rt, on_it, first)
        taker = CallPreparer(s, rt.http, "o", f"a1@{host}:1")
        assert rt.run(taker.take_over([first, second])).calls == [], "a duplicate: dropped"
        live.kill()
    assert [r["attempts"] for r in audio_rows(db).values()] == [1, 1]

    def dies(call_id: int) -> None:  # what a process that dies on it leaves behind
        db.execute(
            "UPDATE call_audio_attempts SET worker = %s WHERE call_id = %s AND ended_at IS NULL",
            (f"a1@{host}:{gone.pid}", call_id),
        )

    dies(first)
    taken = rt.run(taker.take_over([first, second]))
    assert ([c.call_id for c in taken.calls], taken.lost, taken.after_death) == (
        [first, second],
        0,
        True,
    )
    assert [r["attempts"] for r in audio_rows(db).values()] == [2, 1], "the death counted"
    assert rt.run(taker.start_attempt(taken.calls[0]))
    dies(first)
    taken = rt.run(taker.take_over([first, second]))
    assert ([c.call_id for c in taken.calls], taken.lost) == ([second], 1)
    row = audio_rows(db)[first]
    assert (row["state"], row["error_code"], row["attempts"]) == ("failed", "worker_lost", 2)
    outcomes = db.execute(
        "SELECT attempt, outcome FROM call_audio_attempts WHERE call_id = %s ORDER BY id",
        (first,),
    ).fetchall()
    assert outcomes == [(1, "worker_lost"), (2, "worker_lost")]


def test_failures_back_off_exponentially_and_stop_after_the_last_attempt(db, clean):
    (call,) = add_calls(db, 1)
    s = settings(AUDIO_LEASE_SEC=30, AUDIO_RETRY_BASE_SEC=10, AUDIO_MAX_ATTEMPTS=3)
    rt = Runtime.current()
    delays = []
    for attempt in (1, 2, 3):
        db.execute("UPDATE call_audio SET next_attempt_at = now() WHERE call_id = %s", (call,))
        asyncio.run(claim(clean, s, f"o{attempt}"))
        prep = CallPreparer(s, rt.http, f"o{attempt}", "test:1")
        claimed = start(rt, prep, call)
        result = rt.run(prep.mark_failed(claimed, AudioFailure("http_404", "gone")))
        row = db.execute(
            "SELECT state, EXTRACT(EPOCH FROM next_attempt_at - updated_at), attempts,"
            " last_error FROM call_audio WHERE call_id = %s",
            (call,),
        ).fetchone()
        delays.append(round(float(row[1])))
        assert row[2] == attempt and row[3] == "gone"
    assert result == "failed" and row[0] == "failed"
    # AUDIO_RETRY_BASE_SEC doubling, each wait within the backoff's jitter (+-20 %).
    assert 8 <= delays[0] <= 12 and 16 <= delays[1] <= 24 and delays[2] == 0, delays
    assert backoff_sec(2, 10, 3600, retry_after=300) == 300, "a longer Retry-After wins"


def test_a_policy_refusal_fails_at_once(db, clean):
    (call,) = add_calls(db, 1)
    s = settings(AUDIO_MAX_ATTEMPTS=3)
    rt = Runtime.current()
    asyncio.run(claim(clean, s, "o"))
    prep = CallPreparer(s, rt.http, "o", "test:1")
    claimed = start(rt, prep, call)
    refusal = AudioFailure("disallowed_host", "x is not in AUDIO_ALLOWED_HOSTS", retry=False)
    assert rt.run(prep.mark_failed(claimed, refusal)) == "failed"
    row = audio_rows(db)[call]
    assert (row["state"], row["attempts"], row["error_code"]) == ("failed", 1, "disallowed_host")


def test_work_is_split_evenly():
    assert [len(c) for c in split_evenly(list(range(20)), 8)] == [7, 7, 6]
    assert split_evenly([1, 2], 8) == [[1, 2]]
    assert split_evenly([], 8) == []
