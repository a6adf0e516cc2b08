"""What the README promises of the transcription stage, shown with real workers, a real
PostgreSQL (a server of the test's own where it is stopped) and the fake recogniser service
over real HTTP: retries through a database outage, the backoff cap, two workers finishing the
same call, and no database connection held while the recogniser's request is in flight."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.transcription.dispatch import TRANSCRIBE_TASK
from tasks.transcription.jobs import transcribe_call
from tasks.transcription.policy import retry_wait
from tests.conftest import Services
from tests.support.env import ONE_DB_CONNECTION
from tests.support.transcription import (
    mark_dispatched,
    openai_env,
    send_to_transcribe,
    start_transcription,
)
from tests.transcription.conftest import Calls
from tests.transcription.fake_openai import Reply
from workers.core.runtime import Runtime, db_connection
from workers.core.settings import load_settings
from workers.dev.procs import wait_until
from workers.dev.services import ServiceError, ThrowawayPostgres, scratch_database
from workers.recognizers import forget_process_recognizer

pytestmark = pytest.mark.slow


@pytest.fixture
def own_calls(clean: Services, audio_store: Path) -> Iterator[tuple[ThrowawayPostgres, Calls]]:
    """Calls on a PostgreSQL server of this test's own, which it may stop and start."""
    try:
        pg = ThrowawayPostgres().start()
    except (ServiceError, FileNotFoundError) as exc:
        pytest.skip(f"no PostgreSQL binaries to start a server of its own: {exc}")
    try:
        with scratch_database(pg.dsn, "bcfy_asr_outage") as url:
            yield pg, Calls(Services(url, clean.redis_url, pg.dsn), audio_store)
            if not pg.started:
                pg.start_server()  # the database is dropped on the way out
    finally:
        pg.stop()


def answering(calls: Calls) -> bool:
    try:
        with calls.db():
            return True
    except psycopg.OperationalError:
        return False


def test_a_database_outage_mid_call_is_retried_and_the_call_ends_transcribed_once(
    own_calls, procs, tmp_path, client, service
):
    pg, calls = own_calls
    held = threading.Event()
    service.replies.append(Reply(hold=held))
    env = calls.worker_env(
        tmp_path,
        **openai_env(
            service,
            # Claims last ten minutes: the call must not wait for its own claim to run out.
            TRANSCRIBE_TIME_LIMIT_SEC="600",
            TRANSCRIBE_RETRY_BACKOFF_SEC="0.5",
            TRANSCRIBE_RETRY_BACKOFF_MAX_SEC="2",
            DB_CONNECT_TIMEOUT_SEC="2",
        ),
    )
    worker = start_transcription(procs, env, tmp_path)
    call_id = send_to_transcribe(calls, client)
    service.wait_for_requests(1)  # claimed; the recogniser holds its request

    pg.stop_server()  # as a crash would: every connection is cut
    held.set()  # the transcript cannot be stored now
    worker.wait_for_log(f"call {call_id}: transcription attempt 1 failed", timeout=60)
    worker.wait_for_log(f"call {call_id}: cannot claim", timeout=60)  # retries meet the outage
    assert worker.alive()
    pg.start_server()

    wait_until(lambda: answering(calls), 60, "PostgreSQL to answer again")
    wait_until(lambda: calls.state(call_id)["state"] == "done", 90, "the call transcribed")
    (t,) = calls.transcripts(call_id)
    assert t["text"] == "Engine 12 respond to a structure fire."
    assert worker.log().count(f"call {call_id} transcribed by") == 1
    assert worker.alive()


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.1, max_value=100, allow_nan=False),
    cap_over_base=st.floats(min_value=1, max_value=1000, allow_nan=False),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_a_retry_never_waits_longer_than_the_cap(attempt, base, cap_over_base, retry_after):
    cap = min(base * cap_over_base, 3000.0)
    s = load_settings(
        {
            "TRANSCRIBE_RETRY_BACKOFF_SEC": repr(base),
            "TRANSCRIBE_RETRY_BACKOFF_MAX_SEC": repr(cap),
            "BROKER_VISIBILITY_TIMEOUT_SEC": "7200",
        }
    )
    wait = retry_wait(attempt, s, retry_after)
    assert 0 <= wait <= s.transcription.retry_backoff_max_sec
    if retry_after is not None:
        # What the service asked for, unless that is past the cap.
        assert wait >= min(retry_after, s.transcription.retry_backoff_max_sec) - 0.05


def test_retries_through_a_worker_wait_no_longer_than_the_cap(
    calls, procs, tmp_path, client, service
):
    # Doubling from 0.5 s would reach 4 s by the fourth attempt, and the service asks for an
    # hour; TRANSCRIBE_RETRY_BACKOFF_MAX_SEC caps every wait at 1 s.
    service.replies += [
        Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "3600"}),
        Reply(503, {"error": {"message": "busy"}}),
        Reply(503, {"error": {"message": "busy"}}),
        Reply(503, {"error": {"message": "busy"}}),
    ]
    env = calls.worker_env(
        tmp_path,
        **openai_env(
            service,
            TRANSCRIBE_RETRY_BACKOFF_SEC="0.5",
            TRANSCRIBE_RETRY_BACKOFF_MAX_SEC="1",
            TRANSCRIBE_MAX_ATTEMPTS="6",
        ),
    )
    worker = start_transcription(procs, env, tmp_path)
    call_id = send_to_transcribe(calls, client)
    wait_until(lambda: calls.state(call_id)["state"] == "done", 120, "the call transcribed")

    waits = [float(w) for w in re.findall(r"retry in ([0-9.]+)s", worker.log())]
    assert len(waits) == 4, worker.log()[-3000:]
    assert all(0 < w <= 1 for w in waits), waits
    assert calls.state(call_id)["attempts"] == 5
    assert len(calls.transcripts(call_id)) == 1


def expire_claim(calls: Calls, call_id: int) -> None:
    """As if the claim had run out while its worker was still recognising."""
    with calls.db() as conn:
        conn.execute(
            "UPDATE call_transcription SET due_at = now() - interval '1 second' WHERE call_id = %s",
            (call_id,),
        )


def test_two_workers_finishing_the_same_call_store_one_transcript(
    calls, procs, tmp_path, client, service
):
    first_held, second_held = threading.Event(), threading.Event()
    service.replies += [Reply(hold=first_held), Reply(hold=second_held)]
    env = calls.worker_env(tmp_path, **openai_env(service))
    one = start_transcription(procs, env, tmp_path, "asr1")
    call_id = send_to_transcribe(calls, client)
    service.wait_for_requests(1)  # asr1 holds the call

    two = start_transcription(procs, env, tmp_path, "asr2")
    expire_claim(calls, call_id)
    client.send_task(TRANSCRIBE_TASK, kwargs={"call_id": call_id}, queue="transcription")
    service.wait_for_requests(2)  # asr2 took it over: both are recognising the same call
    assert calls.state(call_id)["claimed_by"].startswith("asr2@")

    second_held.set()  # asr2 finishes first and stores its transcript
    two.wait_for_log(f"call {call_id} transcribed by", timeout=60)
    first_held.set()  # then asr1 finishes too
    one.wait_for_log(f"call {call_id}: another worker stored its transcript first", timeout=60)

    assert len(calls.transcripts(call_id)) == 1
    assert f"call {call_id} transcribed by" not in one.log()
    state = calls.state(call_id)
    assert (state["state"], state["attempts"]) == ("done", 2)


def test_no_connection_is_held_while_the_recogniser_request_is_in_flight(
    calls, use_env, tmp_path, service
):
    # One connection in this process's pool. While transcribe_call waits for the recogniser,
    # another coroutine of the same process borrows it: it could not if the task held it.
    held = threading.Event()
    service.replies.append(Reply(hold=held))
    use_env(
        AUDIO_STORE_DIR=str(calls.store),
        **ONE_DB_CONNECTION,
        TRANSCRIBE_OPENAI_API_KEY="",
        **openai_env(service),
    )
    forget_process_recognizer()
    call_id = calls.add()
    mark_dispatched(calls, call_id)
    rt = Runtime.current()
    outcome: list[object] = []
    task = threading.Thread(
        target=lambda: outcome.append(transcribe_call.apply(kwargs={"call_id": call_id}).get())
    )
    task.start()
    try:
        service.wait_for_requests(1)  # claimed, and the request is in flight

        async def borrow() -> int:
            async with db_connection() as conn:
                (pid,) = await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or (0,)
                return int(pid)

        backend = asyncio.run_coroutine_threadsafe(borrow(), rt.loop).result(timeout=60)
        assert backend > 0
        assert calls.state(call_id)["state"] == "running", "the request was still in flight"
    finally:
        held.set()
        task.join(60)
        forget_process_recognizer()
    assert outcome == ["done"]
    assert len(calls.transcripts(call_id)) == 1
