"""The singleton lock against real Redis: exclusion, token-checked release and renewal,
expiry of a crashed holder, duplicate ticks, triggers that ask for one more pass."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import Services
from workers.core.clock import redis_time_ms
from workers.core.locks import (
    Acquired,
    Released,
    SingletonLock,
    holder_of,
    job_keys,
    late_count,
    skip_count,
)
from workers.dev.procs import wait_until

JOB = "tests.locks.job"


@pytest.fixture
def r(clean: Services):
    client = clean.redis()
    yield client
    client.close()


def lock(r, **kw) -> SingletonLock:
    return SingletonLock(r, JOB, ttl=kw.pop("ttl", 2.0), **kw)


def test_second_acquirer_is_told_who_holds_it_and_counted(r):
    a, b = lock(r, token="host-a:1:x"), lock(r, token="host-b:2:y")
    assert a.acquire()
    got = b.acquire()
    assert got.outcome is Acquired.HELD and got.holder == "host-a:1:x"
    assert skip_count(r, JOB) == 1
    assert a.release() is Released.RELEASED
    assert b.acquire()


def test_release_never_deletes_someone_elses_lock(r):
    a = lock(r, ttl=0.3)
    assert a.acquire()
    wait_until(lambda: holder_of(r, JOB) is None, 10, "a's lock to expire")
    b = lock(r)
    assert b.acquire()
    assert a.release() is Released.NOT_OURS
    assert holder_of(r, JOB) == b.token
    assert a.extend() is False


def test_a_crashed_holder_frees_the_lock_within_its_ttl(r):
    crashed = lock(r, ttl=0.5)
    assert crashed.acquire()  # never released, never renewed
    other = lock(r)
    assert not other.acquire()
    time.sleep(0.6)
    assert other.acquire()


def test_background_renewal_keeps_it_past_the_ttl(r):
    a = lock(r, ttl=1.0, renew_every=0.1)
    assert a.acquire()
    a.start_renewing()
    time.sleep(2.5)  # well past the TTL: only renewal can have kept it
    wait_until(lambda: a.renewals >= 5, 30, "five renewals")
    assert holder_of(r, JOB) == a.token
    assert not a.lost
    assert a.release() is Released.RELEASED
    assert holder_of(r, JOB) is None


def test_renewal_notices_a_lost_lock_and_says_so(r):
    lost = threading.Event()
    a = lock(r, ttl=2, renew_every=0.1, on_lost=lost.set)
    assert a.acquire()
    a.start_renewing()
    r.set(job_keys(JOB)[0], "someone-else")
    assert lost.wait(30)
    assert a.lost
    assert a.release() is Released.NOT_OURS
    assert r.get(job_keys(JOB)[0]) == b"someone-else"


def test_a_tick_slot_runs_once_even_after_release(r):
    a = lock(r)
    assert a.acquire(tick_slot=100, tick_ttl=10)
    a.release()
    dup = lock(r).acquire(tick_slot=100, tick_ttl=10)
    assert dup.outcome is Acquired.DUPLICATE_TICK
    older = lock(r).acquire(tick_slot=99, tick_ttl=10)
    assert older.outcome is Acquired.DUPLICATE_TICK
    assert lock(r).acquire(tick_slot=101, tick_ttl=10)


def test_a_trigger_during_a_run_buys_one_more_pass(r):
    a = lock(r)
    assert a.acquire()
    assert lock(r).acquire(trigger=True).outcome is Acquired.HELD
    assert lock(r).acquire(trigger=True).outcome is Acquired.HELD  # two triggers: one pass
    assert a.release(allow_run_again=True) is Released.RUN_AGAIN
    assert holder_of(r, JOB) == a.token
    assert a.release(allow_run_again=True) is Released.RELEASED
    assert holder_of(r, JOB) is None


def test_a_skipped_tick_does_not_ask_for_another_pass(r):
    a = lock(r)
    assert a.acquire()
    assert lock(r).acquire(tick_slot=5, tick_ttl=10).outcome is Acquired.HELD
    assert a.release(allow_run_again=True) is Released.RELEASED


def test_a_tick_is_late_by_redis_clock_not_the_workers(r):
    # Stamped by Redis's clock, judged by Redis's clock: this process's clock takes no part.
    now = redis_time_ms(r)
    late = lock(r).acquire(tick_slot=1, tick_ttl=5, tick_sent_ms=now - 2500, tick_grace=2)
    assert late.outcome is Acquired.LATE and int(late.holder) >= 2500
    assert holder_of(r, JOB) is None, "a late tick takes nothing"
    assert late_count(r, JOB) == 1 and skip_count(r, JOB) == 0
    assert r.get(job_keys(JOB)[1]) is None, "nor its slot: a fresh tick of it may still run"
    fresh = lock(r).acquire(tick_slot=1, tick_ttl=5, tick_sent_ms=now - 1500, tick_grace=2)
    assert fresh.outcome is Acquired.YES
