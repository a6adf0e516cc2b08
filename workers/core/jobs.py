"""Periodic jobs: an `async def` body wrapped in the singleton lock, error isolation and a run log.

    @periodic_job("tasks.ingest.poll_followed_playlists")
    async def poll_followed_playlists(ctx: JobContext) -> None: ...

Each run, in the worker process that received the message:
  1. takes the job's lock (`workers.core.locks`); a beat tick that waited longer than its grace (by
     Redis's clock) is dropped with a WARNING; if another run holds the lock, or this tick's slot
     already ran, the run is skipped: logged at WARNING, counted, recorded, never retried;
  2. runs the body on the process's event loop while a thread renews the lock; the body is
     cancelled when the lock is lost, the soft time limit passes or the process gets SIGTERM;
  3. catches every exception at this boundary (logged with its traceback; the worker lives on);
  4. releases the lock by compare-and-delete on every way out, then writes one `job_runs` row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from celery import Task, signals
from celery.app.task import Context
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from psycopg.rows import TupleRow

from beat_schedule import TICK_GRACE_HEADER, TICK_INTERVAL_HEADER, TICK_SENT_HEADER
from workers.app import app, configured_settings
from workers.core.identity import identity_of, machine_and_pid, unique_token, worker_identity
from workers.core.locks import Acquired, Released, SingletonLock, holder_of
from workers.core.runtime import Runtime, db_connection, in_pool_child, run_to_completion
from workers.core.settings import Settings
from workers.core.text import error_text

log = logging.getLogger(__name__)


class JobOutcome(StrEnum):
    """How a run ended: job_runs.outcome, and what the task returns."""

    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"  # another run held the lock, or this tick's slot already ran
    LOST_LOCK = "lost_lock"  # stopped before writing more: another run may hold the lock
    EXPIRED = "expired"  # a late beat tick, dropped (returned, not recorded in job_runs)


class LockLost(Exception):
    """The run's lock expired or was taken: it must not write anything more."""


@dataclass
class JobContext:
    """What a job body gets: settings, the shared clients, and its lock's state."""

    job: str
    settings: Settings
    runtime: Runtime
    lock: SingletonLock
    triggered: bool  # True for a direct trigger, False for a beat tick
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def http(self) -> httpx.AsyncClient:
        return self.runtime.http

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[TupleRow]]:
        """Borrow a database connection (always returned; commit on success)."""
        return db_connection()

    def ensure_lock(self) -> None:
        """Call before a write that must not happen once another run may hold the lock."""
        if self.lock.lost:
            raise LockLost(self.job)


JobBody = Callable[..., Awaitable[Any]]

# The periodic jobs' task names (for _record_hard_time_limit).
_PERIODIC: set[str] = set()
# Task ids of the killed runs recorded so far (Celery signals task_failure twice for one).
_RECORDED_KILLS: deque[str] = deque(maxlen=256)


def periodic_job(name: str, *, rerun_on_trigger: bool = False) -> Callable[[JobBody], Task]:
    """Register an async job body as a singleton Celery task named `name` (declared, with its
    queue, interval and time limits, in beat_schedule.JOBS).

    rerun_on_trigger: a trigger (not a beat tick) that arrives while the job runs makes the
    running holder do one more pass when it finishes, instead of being dropped.

    The body's asyncio deadline is JOB_SOFT_TIME_LIMIT_SEC: it cancels a well-behaved body
    cleanly first; Celery's signal-based limits (the app's task_annotations, between the soft
    and the hard limit) are the backstop for one that blocks its loop.
    """

    def decorate(body: JobBody) -> Task:
        def run(self: Task, **kwargs: Any) -> JobOutcome:
            return run_singleton(self, body, kwargs, rerun_on_trigger=rerun_on_trigger)

        run.__doc__ = body.__doc__
        run.__name__ = body.__name__
        task: Task = app.task(
            name=name,
            bind=True,
            ignore_result=True,
            # Acked when the run ends: with prefetch 1 a busy child holds no further tick, so
            # an idle worker takes it. A tick redelivered after a crash is past its grace by
            # then (by Redis's clock) and dropped, so late acks never make a run late.
            acks_late=True,
        )(run)
        _PERIODIC.add(name)
        return task

    return decorate


def lock_name(task_name: str, kwargs: dict[str, Any]) -> str:
    """One lock per task, and per argument set where a task takes arguments."""
    if not kwargs:
        return task_name
    digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()
    return f"{task_name}:{digest[:16]}"


@dataclass(frozen=True)
class Tick:
    """A beat tick, as its headers describe it."""

    sent_ms: int  # when beat sent it, by Redis's clock
    interval: float
    grace: float

    @property
    def slot(self) -> int:
        """Ticks in the same interval-long slot are duplicates: two beat processes running by
        mistake send one tick per slot each, and only the first may run."""
        return int((self.sent_ms / 1000) // self.interval)

    @property
    def slot_ttl(self) -> float:
        """How long to remember that a slot ran."""
        return self.interval + self.grace


def tick_of(request: Context) -> Tick | None:
    """The beat tick a task request carries; None for a direct trigger."""
    headers = getattr(request, "headers", None) or {}

    def header(name: str) -> Any:
        return headers.get(name) or getattr(request, name, None)

    sent, interval, grace = (
        header(TICK_SENT_HEADER),
        header(TICK_INTERVAL_HEADER),
        header(TICK_GRACE_HEADER),
    )
    if sent is None or not interval or grace is None:
        return None
    return Tick(sent_ms=int(sent), interval=float(interval), grace=float(grace))


def run_singleton(
    task: Task, body: JobBody, kwargs: dict[str, Any], *, rerun_on_trigger: bool
) -> JobOutcome:
    rt = Runtime.current()
    s = rt.settings
    soft = s.jobs.soft_time_limit_sec
    job = lock_name(task.name, kwargs)
    worker = worker_identity()
    lock = SingletonLock(
        rt.redis,
        job,
        ttl=s.jobs.lock_ttl_sec,
        renew_every=s.jobs.lock_renew_sec,
        token=unique_token(worker),
    )
    tick = tick_of(task.request)
    started = _now()
    try:
        got = lock.acquire(
            tick_slot=tick.slot if tick else None,
            tick_ttl=tick.slot_ttl if tick else 0,
            trigger=tick is None,
            tick_sent_ms=tick.sent_ms if tick else None,
            tick_grace=tick.grace if tick else 0,
        )
    except Exception as exc:
        # Without Redis nobody can tell whether another run holds the lock: do not run.
        log.error("job %s not run: could not take its lock: %s", job, _error_text(exc))
        _record_run(rt, job, worker, started, _now(), JobOutcome.ERROR, f"lock unavailable: {exc}")
        return JobOutcome.ERROR
    if got.outcome is Acquired.LATE:
        # Missed runs coalesce: a tick that waited out its grace (workers down) is dropped, not
        # run late, and not recorded as a run. Timed by Redis's clock, not this host's.
        log.warning(
            "job %s: tick expired in the queue (waited %.1fs by Redis's clock, grace %gs); dropped",
            job,
            int(got.holder) / 1000,
            tick.grace if tick else 0,
        )
        return JobOutcome.EXPIRED
    if not got:
        if got.outcome is Acquired.DUPLICATE_TICK:
            reason = f"duplicate beat tick: slot {tick.slot if tick else '?'} already ran"
        else:
            reason = f"already running, held by {got.holder}"
        log.warning("job %s skipped: %s", job, reason)
        _record_run(rt, job, worker, started, _now(), JobOutcome.SKIPPED, reason)
        return JobOutcome.SKIPPED

    ctx = JobContext(job, s, rt, lock, triggered=tick is None, kwargs=kwargs)
    while True:
        terminated: _Terminated | None = None
        try:
            outcome, error = _run_body_holding(rt, lock, body, ctx, soft)
        except _Terminated as exc:
            terminated, outcome, error = exc, JobOutcome.ERROR, exc.reason
        ended = _now()
        released = Released.NOT_OURS
        try:
            if outcome != JobOutcome.LOST_LOCK:
                released = lock.release(allow_run_again=rerun_on_trigger and not terminated)
                if released is Released.NOT_OURS:
                    # The token check failed: the lock expired under us without the renewer
                    # noticing (Redis unreachable for a whole TTL). The work itself finished.
                    log.error("job %s: lock was no longer ours at release", job)
        except Exception as exc:
            # Redis unreachable: the lock frees itself when its TTL runs out.
            log.error("job %s: could not release lock: %s", job, _error_text(exc))
        finally:
            _record_run(rt, job, worker, started, ended, outcome, error)
        if terminated is not None:
            raise terminated
        if released is not Released.RUN_AGAIN:
            return outcome
        log.info("job %s: triggered while running; one more pass", job)
        started = _now()


def _run_body_holding(
    rt: Runtime, lock: SingletonLock, body: JobBody, ctx: JobContext, soft: float
) -> tuple[JobOutcome, str | None]:
    """Run the body once while renewing the lock. Returns (outcome, error text)."""
    loop = rt.loop
    why_cancelled: list[str] = []

    deadlines: list[asyncio.Timeout] = []

    async def guarded() -> Any:
        async with asyncio.timeout(soft) as deadline:
            deadlines.append(deadline)
            return await body(ctx, **ctx.kwargs)

    main = loop.create_task(guarded(), name=ctx.job)

    def cancel(reason: str) -> None:
        why_cancelled.append(reason)
        main.cancel()

    lock.on_lost = lambda: loop.call_soon_threadsafe(cancel, JobOutcome.LOST_LOCK)
    on_sigterm = _install_sigterm(loop, lambda: cancel("terminated by SIGTERM"))
    lock.start_renewing()
    try:
        run_to_completion(loop, main)
        return JobOutcome.OK, None
    except asyncio.CancelledError:
        if lock.lost:
            return JobOutcome.LOST_LOCK, "lock lost while running; stopped before writing more"
        reason = why_cancelled[0] if why_cancelled else "cancelled"
        log.error("job %s: %s", ctx.job, reason)
        if on_sigterm and "SIGTERM" in reason:
            # Finish our bookkeeping (lock, run log), then let the process stop as asked.
            raise _Terminated(reason) from None
        return JobOutcome.ERROR, reason
    except LockLost:
        return JobOutcome.LOST_LOCK, "lock lost while running; stopped before writing more"
    except TimeoutError:
        if not (deadlines and deadlines[0].expired()):
            log.exception("job %s failed", ctx.job)
            return JobOutcome.ERROR, "timed out"
        log.error("job %s: soft time limit (%gs) reached; run cancelled", ctx.job, soft)
        return JobOutcome.ERROR, f"soft time limit ({soft:g}s) reached"
    except SoftTimeLimitExceeded:
        log.error("job %s: Celery soft time limit reached (event loop blocked?)", ctx.job)
        return JobOutcome.ERROR, "soft time limit reached (Celery backstop)"
    except Exception as exc:
        log.exception("job %s failed", ctx.job)
        return JobOutcome.ERROR, _error_text(exc)
    finally:
        lock.stop_renewing()
        lock.on_lost = None
        if on_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


class _Terminated(SystemExit):
    """Raised after cleanup when SIGTERM interrupted a run: the process then exits."""

    def __init__(self, reason: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.reason = reason


def _install_sigterm(loop: asyncio.AbstractEventLoop, on_term: Callable[[], None]) -> bool:
    """In a prefork child, turn SIGTERM during a run into a clean cancel. Not in a main process:
    there SIGTERM means Celery's own warm shutdown, which lets the run finish."""
    if not in_pool_child():
        return False
    loop.add_signal_handler(signal.SIGTERM, on_term)
    return True


def _error_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return error_text(text)


def _now() -> datetime:
    return datetime.now(UTC)


@signals.task_failure.connect
def _record_hard_time_limit(
    sender: Task | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """A run killed by Celery's hard time limit (its body blocked the event loop past the
    asyncio deadline and Celery's soft limit) cannot record itself: its pool process is killed.
    The worker's main process, which enforces the limit, records it here as `error`. It does so
    on a connection of its own, opened and closed at once: the main process keeps none, so no
    connection crosses a fork. The lock is left to run out (LOCK_TTL_SEC): its holder is being
    killed, and the renewing thread dies with it."""
    name = getattr(sender, "name", None)
    if not isinstance(exception, TimeLimitExceeded) or name not in _PERIODIC:
        return
    if task_id in _RECORDED_KILLS:
        return
    _RECORDED_KILLS.append(str(task_id))
    s = configured_settings()
    hard = float(getattr(sender, "time_limit", None) or s.jobs.time_limit_sec)
    job = lock_name(name, kwargs or {})
    ended = _now()
    worker = worker_identity()
    try:
        client = redis.Redis.from_url(s.services.redis_url.reveal(), socket_timeout=5)
        try:
            token = holder_of(client, job)
        finally:
            client.close()
        holder = machine_and_pid(identity_of(token)) if token else None
        if token and holder and _is_my_child(holder[1]):
            worker = identity_of(token)  # the pool process being killed
    except redis.RedisError as exc:
        log.warning("job %s: could not tell which process ran it: %s", job, _error_text(exc))
    error = (
        f"hard time limit ({hard:g}s) reached; its pool process was killed (event loop blocked?)"
    )
    log.error("job %s: %s", job, error)
    try:
        with psycopg.connect(
            s.services.database_url.reveal(),
            autocommit=True,
            connect_timeout=int(s.services.db_connect_timeout_sec),
        ) as conn:
            conn.execute(
                "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome, error)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (job, worker, ended - timedelta(seconds=hard), ended, JobOutcome.ERROR, error),
            )
    except Exception as exc:
        log.error("job %s: could not record run (%s): %s", job, JobOutcome.ERROR, _error_text(exc))


def _is_my_child(pid: int) -> bool:
    """True when `pid` is a process whose parent is this one (a pool process of this worker)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()


def _record_run(
    rt: Runtime,
    job: str,
    worker: str,
    started: datetime,
    ended: datetime,
    outcome: JobOutcome,
    error: str | None,
) -> None:
    """One row per run in job_runs. A database outage must not break the job: log and go on."""

    async def insert() -> None:
        async with db_connection() as conn:
            await conn.execute(
                "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome, error)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (job, worker, started, ended, outcome, error),
            )

    try:
        rt.run(asyncio.wait_for(insert(), timeout=rt.settings.services.db_connect_timeout_sec))
    except Exception as exc:
        log.error("job %s: could not record run (%s): %s", job, outcome, _error_text(exc))
