"""The dispatcher against real PostgreSQL and Redis: which calls, in what order, how many, the
lease that covers a crash between marking and sending, backpressure, and when a redelivered
message may take over a claim."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import psycopg
import pytest

from tasks.transcription.claims import Skip, TranscriptionClaim, claim_call
from tasks.transcription.dispatch import (
    QUEUE,
    TRANSCRIBE_TASK,
    dispatch_once,
    mark_dispatched,
    queued_messages,
)
from workers.core.identity import worker_identity
from workers.core.runtime import Runtime


def queued_calls(redis_client) -> list[int]:
    """The call ids of the messages waiting in the transcription queue, oldest sent first."""
    out = []
    for raw in reversed(redis_client.lrange(QUEUE, 0, -1)):  # kombu LPUSHes, workers BRPOP
        message = json.loads(raw)
        assert message["headers"]["task"] == TRANSCRIBE_TASK
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append(kwargs["call_id"])
    return out


def dispatch(settings, redis_client):
    return Runtime.current().run(dispatch_once(settings, redis_client))


@pytest.fixture
def r(clean):
    client = clean.redis()
    yield client
    client.close()


def test_only_ready_audio_makes_a_call_transcribable(calls):
    ready = calls.add()
    waiting = calls.add(ready=False)
    assert calls.state(ready)["state"] == "pending"
    with calls.db() as conn:
        assert conn.execute(
            "SELECT count(*) FROM call_transcription WHERE call_id = %s", (waiting,)
        ).fetchone() == (0,)
        calls.make_ready(conn, waiting, "prepared/call02.flac")
    assert calls.state(waiting)["state"] == "pending"


def test_ready_calls_are_sent_oldest_first_in_batches(calls, use_env, r):
    settings = use_env(TRANSCRIBE_DISPATCH_BATCH="3", TRANSCRIBE_MAX_AGE_HOURS="72")
    ids = [calls.add(ago=timedelta(minutes=m)) for m in (50, 10, 40, 20, 30)]
    calls.add(ready=False, ago=timedelta(minutes=60))  # audio not ready yet
    too_old = calls.add(ago=timedelta(hours=73))
    done = calls.add(ago=timedelta(minutes=55))
    calls.update(done, "state = 'done', due_at = NULL")
    oldest_first = [ids[0], ids[2], ids[4], ids[3], ids[1]]

    first = dispatch(settings, r)
    assert (first.sent, first.held_back) == (3, False)
    assert queued_calls(r) == oldest_first[:3]
    assert dispatch(settings, r).sent == 2
    assert queued_calls(r) == oldest_first
    assert dispatch(settings, r).sent == 0, "sent calls are not sent again while leased"
    for call_id in oldest_first:
        state = calls.state(call_id)
        assert (state["state"], state["dispatch_count"]) == ("dispatched", 1)
    assert calls.state(too_old)["state"] == "pending"


def test_newest_first_is_an_option(calls, use_env, r):
    settings = use_env(TRANSCRIBE_DISPATCH_BATCH="2", TRANSCRIBE_DISPATCH_ORDER="newest")
    ids = [calls.add(ago=timedelta(minutes=m)) for m in (30, 10, 20)]
    assert dispatch(settings, r).sent == 2
    assert queued_calls(r) == [ids[1], ids[2]]


def test_backpressure_sends_nothing_while_the_queue_is_full(calls, use_env, r):
    settings = use_env(TRANSCRIBE_QUEUE_MAX="4", TRANSCRIBE_DISPATCH_BATCH="100")
    ids = [calls.add(ago=timedelta(minutes=60 - i)) for i in range(10)]

    assert dispatch(settings, r).sent == 4, "fills the queue up to its limit, no further"
    full = dispatch(settings, r)
    assert (full.sent, full.queued_before, full.held_back) == (0, 4, True)
    assert r.llen(QUEUE) == 4
    assert [calls.state(i)["state"] for i in ids[4:]] == ["pending"] * 6, "nothing marked"

    r.rpop(QUEUE)  # workers take two messages
    r.rpop(QUEUE)
    assert queued_messages(r) == 2
    assert dispatch(settings, r).sent == 2, "only as many as there is room for"
    assert queued_messages(r) == 4
    assert queued_calls(r) == ids[2:6]


def test_messages_sent_with_a_priority_count_too(calls, use_env, r, client):
    settings = use_env(TRANSCRIBE_QUEUE_MAX="3")
    calls.add()
    for _ in range(3):
        client.send_task(TRANSCRIBE_TASK, kwargs={"call_id": 0}, queue=QUEUE, priority=5)
    assert r.llen(QUEUE) == 0 and queued_messages(r) == 3
    assert dispatch(settings, r).held_back


def test_a_crash_between_marking_and_sending_loses_nothing(calls, use_env, r):
    settings = use_env(TRANSCRIBE_DISPATCH_LEASE_SEC="1.5")
    ids = [calls.add(ago=timedelta(minutes=m)) for m in (3, 2, 1)]
    # The dispatcher marks and commits, then dies before it sends anything.
    assert Runtime.current().run(mark_dispatched(settings, 10)) == ids
    assert dispatch(settings, r).sent == 0, "within the lease they count as sent"
    assert r.llen(QUEUE) == 0
    time.sleep(1.6)
    assert dispatch(settings, r).sent == 3, "the lease ran out: sent again"
    assert queued_calls(r) == ids
    assert {calls.state(i)["dispatch_count"] for i in ids} == {2}


def hold_claim(calls, call_id, claimant):
    """The call claimed by `claimant` for the next hour, on its first attempt."""
    calls.update(
        call_id,
        "state = 'running', claimed_by = %s, attempts = 1, due_at = now() + interval '1 hour'",
        claimant,
    )


def test_a_call_whose_worker_died_is_sent_again_when_the_claim_runs_out(calls, use_env, r):
    settings = use_env()
    call_id = calls.add()
    hold_claim(calls, call_id, "gone:1")
    assert dispatch(settings, r).sent == 0, "claimed by a worker that may be alive"
    calls.update(call_id, "due_at = now() - interval '1 second'")
    assert dispatch(settings, r).sent == 1
    assert calls.state(call_id)["state"] == "dispatched"


def a_process_that_has_ended() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# A claimant as this release names it, and as the release before named it (`<node>:<machine>:
# <pid>`): claims stored by either are read alike.
CLAIMANT_FORMS = {
    "today's form": "asr@{machine}:{pid}",
    "the older form": "asr@x:{machine}:{pid}",
}


@pytest.mark.parametrize("form", CLAIMANT_FORMS)
def test_a_redelivery_takes_over_a_claim_whose_process_on_this_machine_is_gone(
    calls, use_env, form
):
    settings = use_env()
    call_id = calls.add()
    claimant = CLAIMANT_FORMS[form].format(
        machine=socket.gethostname(), pid=a_process_that_has_ended()
    )
    hold_claim(calls, call_id, claimant)
    me = worker_identity()
    claim = Runtime.current().run(claim_call(call_id, me, settings))
    assert isinstance(claim, TranscriptionClaim) and claim.attempt == 2
    assert calls.state(call_id)["claimed_by"] == me


def claimant_where(where: str, form: str) -> str:
    here = socket.gethostname()
    if where == "a live process here":
        return CLAIMANT_FORMS[form].format(machine=here, pid=os.getppid())
    return CLAIMANT_FORMS[form].format(machine=f"not-{here}", pid=999999)


@pytest.mark.parametrize("form", CLAIMANT_FORMS)
@pytest.mark.parametrize("where", ["a live process here", "another machine", "an unknown form"])
def test_a_redelivery_leaves_a_claim_it_cannot_tell_is_dead(calls, use_env, where, form):
    settings = use_env()
    claimant = "gone:1" if where == "an unknown form" else claimant_where(where, form)
    call_id = calls.add()
    hold_claim(calls, call_id, claimant)
    outcome = Runtime.current().run(claim_call(call_id, worker_identity(), settings))
    assert isinstance(outcome, Skip) and "duplicate delivery dropped" in outcome
    state = calls.state(call_id)
    assert (state["claimed_by"], state["attempts"]) == (claimant, 1)


def test_failed_calls_stay_failed_until_their_audio_is_ready_again(calls, use_env, r):
    settings = use_env()
    call_id = calls.add()
    calls.update(
        call_id, "state = 'failed', due_at = NULL, attempts = 5, last_error = 'undecodable'"
    )
    assert dispatch(settings, r).sent == 0
    with calls.db() as conn:  # the audio stage prepares the call again
        conn.execute("UPDATE call_audio SET state = 'pending' WHERE call_id = %s", (call_id,))
        calls.make_ready(conn, call_id, "prepared/call01.flac")
    state = calls.state(call_id)
    assert (state["state"], state["attempts"], state["last_error"]) == ("pending", 0, None)
    assert dispatch(settings, r).sent == 1


def test_the_schema_allows_one_transcript_per_call(calls):
    call_id = calls.add()
    insert = "INSERT INTO transcripts (call_id, text, backend, model) VALUES (%s, 'x', 't', 'm')"
    with calls.db() as conn:
        conn.execute(insert, (call_id,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (call_id,))
