"""The scheduler's rules, shown with real worker and beat processes on real Redis and PostgreSQL:
no overlap across workers, skipped runs logged and recorded, error isolation, crash recovery
within the lock's TTL, renewal, lost locks, expired ticks, duplicate beats, time limits, revoke.
"""

from __future__ import annotations

import itertools
import signal
import time

import pytest
import redis

from beat_schedule import tick_headers
from tests.support.procs import stale_ticks, start_beat, start_worker
from workers.core.clock import redis_time_ms
from workers.core.locks import holder_of, late_count, skip_count
from workers.dev.procs import wait_until

pytestmark = pytest.mark.slow

SLEEPER = "tests.jobs.sleeper"


def notes(r: redis.Redis, key: str) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in r.lrange(key, 0, -1)]


def ticks_sent(beat_log: str, task: str = SLEEPER) -> int:
    """How many ticks of `task` a beat process says it sent."""
    return beat_log.count(f"Sending due task {task.rsplit('.', 1)[-1]} ({task})")


def broker_idle(r: redis.Redis, queue: str = "ingest") -> bool:
    """No message waiting in `queue` and none taken but not yet acknowledged (tasks here ack
    late: a message stays unacknowledged until its run has ended)."""
    return r.llen(queue) == 0 and r.hlen("unacked") == 0


def test_two_workers_never_run_a_long_job_twice_at_once(env, procs, tmp_path, clean):
    env |= {"TEST_BEAT_JOBS": "sleeper:1", "TEST_SLEEP_SEC": "2.5"}
    procs += [start_worker(f"w{i}", env, tmp_path) for i in (1, 2)]
    beat = start_beat("beat", env, tmp_path)
    procs.append(beat)
    wait_until(lambda: len(clean.job_runs(SLEEPER, "ok")) >= 3, 60, "three completed runs")
    beat.stop()
    for worker in procs[:2]:
        worker.stop(timeout=60)  # warm shutdown: a run under way finishes first

    ok = clean.job_runs(SLEEPER, "ok")
    for before, after in itertools.pairwise(ok):
        assert after.started_at >= before.ended_at, f"runs overlapped: {before} and {after}"
    skipped = clean.job_runs(SLEEPER, "skipped")
    assert len(skipped) >= 3, "ticks arriving during a run must be skipped"
    assert all("already running, held by" in r.error for r in skipped)
    # Both hosts took part, and each skip was logged with the holder and counted.
    assert {r.worker.split("@")[0] for r in clean.job_runs(SLEEPER)} == {"w1", "w2"}
    logs = "".join(p.log() for p in procs)
    assert "WARNING" in logs and f"job {SLEEPER} skipped: already running, held by w" in logs
    assert skip_count(clean.redis(), SLEEPER) == len(skipped)
    assert len(notes(clean.redis(), "test:starts")) == len(ok)


def test_beat_runs_a_new_entry_at_once_and_remembers_it_across_restarts(
    env, procs, tmp_path, clean
):
    # A daily job (the geo refresh) must not wait a day after the first deployment, nor run
    # again each time beat restarts.
    env |= {"TEST_BEAT_JOBS": "sleeper:86400"}
    procs.append(start_worker("w1", env, tmp_path))
    beat = start_beat("beat", env, tmp_path)
    procs.append(beat)
    wait_until(lambda: clean.job_runs(SLEEPER, "ok"), 30, "the first run, at once")
    beat.stop()

    # Restarted with the same schedule file, and a second entry due every second: once beat
    # has sent that one twice it has gone through its schedule, and a forgotten daily entry
    # would have been due (and sent) at once.
    again = start_beat("beat", env | {"TEST_BEAT_JOBS": "sleeper:86400,failing:1"}, tmp_path)
    procs.append(again)
    wait_until(
        lambda: ticks_sent(again.log(), "tests.jobs.failing") >= 2, 60, "two ticks of another job"
    )
    again.stop()
    assert ticks_sent(again.log()) == 0, again.log()
    assert len(clean.job_runs(SLEEPER)) == 1


def test_a_failing_body_releases_its_lock_and_the_next_tick_runs(env, procs, tmp_path, clean):
    job = "tests.jobs.failing"
    env |= {"TEST_BEAT_JOBS": "failing:1"}
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    beat = start_beat("beat", env, tmp_path)
    procs.append(beat)
    wait_until(lambda: len(clean.job_runs(job, "error")) >= 3, 20, "three failed runs")
    beat.stop()

    errors = clean.job_runs(job, "error")
    assert all("RuntimeError: deliberate failure in the job body" in r.error for r in errors)
    assert worker.alive()
    assert len({r.worker for r in errors}) == 1, "the same worker process ran every tick"
    assert "Traceback (most recent call last)" in worker.log()
    assert holder_of(clean.redis(), job) is None
    assert clean.job_runs(job, "skipped") == []


def test_a_killed_holder_frees_the_job_when_its_lock_expires(env, procs, tmp_path, clean):
    env |= {"TEST_BEAT_JOBS": "sleeper:1", "TEST_SLEEP_SEC": "60"}
    workers = {name: start_worker(name, env, tmp_path) for name in ("w1", "w2")}
    procs += workers.values()
    procs.append(start_beat("beat", env, tmp_path))
    r = clean.redis()
    first = wait_until(lambda: notes(r, "test:starts"), 30, "the first run to start")[0]
    holder_name = first.split("@")[0]
    time.sleep(1.5)  # past its first renewal (every 1 s)
    # The holder's lock lives at most LOCK_TTL_SEC (3 s) beyond its last renewal, so what a
    # dead holder leaves expires on its own (how soon the next run follows is for bench/).
    assert holder_of(r, SLEEPER) == first.split()[0]
    assert 0 < r.pttl(f"bcfy:job:{{{SLEEPER}}}:lock") <= 3000
    workers[holder_name].kill_group()  # SIGKILL: no chance to release anything

    # The run never released it (its 60 s body was cut short), so only expiry frees it.
    second = wait_until(lambda: notes(r, "test:starts")[1:], 60, "another worker to take over")
    assert not second[0].startswith(holder_name)
    assert clean.job_runs(SLEEPER, "ok") == []


def test_renewal_keeps_the_lock_past_its_ttl(env, procs, tmp_path, clean, client):
    # The run outlasts its TTL many times over, so that "still running" below does not depend
    # on how quickly this machine gets back to the test.
    env |= {"LOCK_TTL_SEC": "1.5", "LOCK_RENEW_SEC": "0.5", "TEST_SLEEP_SEC": "10"}
    procs.append(start_worker("w1", env, tmp_path, concurrency=2))
    client.send_task(SLEEPER, queue="ingest")
    r = clean.redis()
    (start,) = wait_until(lambda: notes(r, "test:starts"), 30, "the run to start")
    token, started_at = start.split()
    time.sleep(max(0.0, float(started_at) + 2.5 - time.time()))  # well past the 1.5 s TTL
    assert holder_of(r, SLEEPER) == token
    assert notes(r, "test:ends") == [], "still running (else this shows nothing about renewal)"
    client.send_task(SLEEPER, queue="ingest")
    wait_until(lambda: clean.job_runs(SLEEPER, "ok"), 60, "the long run to finish")

    (ok,) = clean.job_runs(SLEEPER, "ok")
    assert (ok.ended_at - ok.started_at).total_seconds() >= 10
    (skipped,) = clean.job_runs(SLEEPER, "skipped")
    assert "held by w1@" in skipped.error
    assert len(notes(r, "test:starts")) == 1
    assert holder_of(r, SLEEPER) is None


def test_a_run_whose_lock_is_deleted_stops_and_records_lost_lock(
    env, procs, tmp_path, clean, client
):
    env |= {"LOCK_RENEW_SEC": "0.3", "TEST_SLEEP_SEC": "120"}
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    client.send_task(SLEEPER, queue="ingest")
    r = clean.redis()
    wait_until(lambda: notes(r, "test:starts"), 30, "the run to start")
    r.delete(f"bcfy:job:{{{SLEEPER}}}:lock")

    # The body would sleep 120 s: a run recorded before that was stopped, not left to sleep on.
    lost = wait_until(lambda: clean.job_runs(SLEEPER, "lost_lock"), 60, "lost_lock recorded")
    assert "stopped before writing more" in lost[0].error
    assert (lost[0].ended_at - lost[0].started_at).total_seconds() < 120, (
        "it stopped, it did not sleep on"
    )
    # The run is recorded after its body has ended: anything it wrote is there by now.
    assert notes(r, "test:ends") == [], "nothing was written after the lock was lost"
    assert f"lock {SLEEPER} lost" in worker.log()
    assert worker.alive()


def test_an_expired_tick_is_dropped_not_run_late(env, procs, tmp_path, clean, client):
    # Ticks as beat sends them: stamped with Redis's clock.
    r = clean.redis()
    client.send_task(SLEEPER, queue="ingest", headers=tick_headers(1.0, 1.0, redis_time_ms(r)))
    time.sleep(1.5)  # the worker is "down" longer than the grace
    client.send_task(SLEEPER, queue="ingest", headers=tick_headers(1.0, 30.0, redis_time_ms(r)))
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    wait_until(lambda: clean.job_runs(SLEEPER, "ok"), 30, "the fresh tick to run")
    worker.wait_for_log("tick expired in the queue", timeout=30)
    wait_until(lambda: broker_idle(clean.redis()), 30, "both ticks handled")
    assert late_count(clean.redis(), SLEEPER) == 1
    assert len(clean.job_runs(SLEEPER)) == 1
    assert len(notes(clean.redis(), "test:starts")) == 1


def test_missed_ticks_coalesce_when_workers_return(env, procs, tmp_path, clean):
    env |= {"TEST_BEAT_JOBS": "sleeper:0.5", "JOB_MISFIRE_GRACE_SEC": "1"}
    queued = stale_ticks(env, tmp_path, procs, clean.redis(), 8)
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    wait_until(
        lambda: late_count(clean.redis(), SLEEPER) == queued and broker_idle(clean.redis()),
        60,
        f"all {queued} stale ticks to be dropped",
    )
    assert worker.log().count("tick expired in the queue") == queued
    assert clean.job_runs(SLEEPER) == [], f"{queued} stale ticks must not run late"


def test_two_beats_by_mistake_never_run_a_tick_twice(env, procs, tmp_path, clean):
    env |= {"TEST_BEAT_JOBS": "sleeper:1"}
    procs.append(start_worker("w1", env, tmp_path, concurrency=2))
    r = clean.redis()
    began_ms = redis_time_ms(r)  # ticks are slotted by Redis's clock
    beats = [start_beat(f"beat{i}", env, tmp_path) for i in (1, 2)]
    procs += beats

    def duplicates() -> list:
        skipped = clean.job_runs(SLEEPER, "skipped")
        return [run for run in skipped if "duplicate beat tick" in run.error]

    wait_until(lambda: len(duplicates()) >= 4, 90, "four ticks recognised as duplicates")
    for b in beats:
        b.stop()
    ended_ms = redis_time_ms(r)
    wait_until(lambda: broker_idle(r), 60, "every tick handled")
    sent = [ticks_sent(b.log()) for b in beats]

    ok = clean.job_runs(SLEEPER, "ok")
    # One run per interval-long slot at most, however many beats send it: every tick was
    # sent within these slots of 1 s (by Redis's clock).
    slots = ended_ms // 1000 - began_ms // 1000 + 1
    assert len(ok) <= slots, f"{len(ok)} runs in {slots} one-second slots ({sent} ticks sent)"
    assert all(sent), f"both beats sent ticks: {sent}"
    # The duplicates are the second beat's ticks, not every tick after the first: each beat
    # alone sends one tick per slot, and most slots run (a tick taken by the other process
    # of the pool a moment before an earlier one can make that earlier one a duplicate).
    assert len(ok) * 2 >= max(sent), f"only {len(ok)} runs of {sent} ticks per beat"


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_soft_time_limit_cancels_the_run_and_releases_the_lock(
    env, procs, tmp_path, clean, client, pool
):
    env |= {"JOB_SOFT_TIME_LIMIT_SEC": "1", "JOB_TIME_LIMIT_SEC": "20", "TEST_SLEEP_SEC": "15"}
    worker = start_worker("w1", env, tmp_path, pool=pool)
    procs.append(worker)
    client.send_task(SLEEPER, queue="ingest")
    (err,) = wait_until(lambda: clean.job_runs(SLEEPER, "error"), 8, "the time-limited run")
    assert "soft time limit (1s) reached" in err.error
    assert holder_of(clean.redis(), SLEEPER) is None
    assert notes(clean.redis(), "test:ends") == []
    # Celery enforces no time limit in the solo pool: the worker says so as it starts.
    warned = "solo pool: Celery's task time limits are not enforced" in worker.log()
    assert warned == (pool == "solo")


def test_revoking_a_running_job_releases_its_lock(env, procs, tmp_path, clean, client):
    env |= {"TEST_SLEEP_SEC": "8"}
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    result = client.send_task(SLEEPER, queue="ingest")
    r = clean.redis()
    wait_until(lambda: notes(r, "test:starts"), 10, "the run to start")
    assert holder_of(r, SLEEPER) is not None
    client.control.revoke(result.id, terminate=True)

    (err,) = wait_until(lambda: clean.job_runs(SLEEPER, "error"), 10, "the revoked run")
    assert "terminated by SIGTERM" in err.error
    assert holder_of(r, SLEEPER) is None
    assert worker.alive(), "the worker replaces the terminated child and goes on"
    # The next run is not blocked by a stale lock.
    client.send_task(SLEEPER, queue="ingest", kwargs={})
    wait_until(lambda: len(notes(r, "test:starts")) == 2, 15, "the next run to start")


def test_sigterm_to_a_worker_lets_the_running_job_finish_and_release(
    env, procs, tmp_path, clean, client
):
    env |= {"TEST_SLEEP_SEC": "3"}
    worker = start_worker("w1", env, tmp_path)
    procs.append(worker)
    client.send_task(SLEEPER, queue="ingest")
    r = clean.redis()
    wait_until(lambda: notes(r, "test:starts"), 10, "the run to start")
    worker.popen.send_signal(signal.SIGTERM)  # what `docker stop` and `bcfy run` send

    assert worker.popen.wait(20) == 0
    (ok,) = clean.job_runs(SLEEPER, "ok")
    assert (ok.ended_at - ok.started_at).total_seconds() >= 3, "the run was finished, not cut short"
    assert len(notes(r, "test:ends")) == 1
    assert holder_of(r, SLEEPER) is None
