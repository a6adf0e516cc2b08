"""Transcription: dispatch prepared calls to the transcription pool and transcribe them.

A call becomes transcribable when its audio becomes ready: a trigger on call_audio gives it a
`call_transcription` row (sql/004_transcription.sql), the dispatcher's work queue.

The dispatcher (`dispatch_ready_calls`, singleton, every TRANSCRIPTION_DISPATCH_INTERVAL_SEC and
at once when the audio stage triggers it):
  1. counts the messages waiting in the transcription queue (LLEN: O(1)) and sends nothing
     while there are TRANSCRIBE_QUEUE_MAX of them (backpressure);
  2. marks up to TRANSCRIBE_DISPATCH_BATCH due calls `dispatched`, with a lease, and commits;
  3. then sends one `transcribe_call` message per call. A crash between 2 and 3 loses nothing:
     when the lease runs out the call is due again and sent again.

The task (`transcribe_call`, on the transcription pool: late acks, prefetch 1):
  1. claims the call in one transaction: only a call that is not done, not failed and not
     claimed by a live worker. A claim lasts the task's hard time limit, after which Celery has
     killed the holder for certain; a claim that ran out makes the call due for the dispatcher
     again. A duplicate delivery finds the call done or claimed and does nothing;
  2. recognises it, directly in the pool process (CPU work; the openai backend drives its HTTP
     request on the process's event loop), holding no database connection;
  3. stores the transcript and marks the call done in one transaction. transcripts.call_id is
     unique: whatever happens, a call never gets two transcripts.
Transient failures are retried with exponential backoff (Celery retry, countdown well below the
broker's visibility timeout); permanent ones, and a call that used up TRANSCRIBE_MAX_ATTEMPTS,
are recorded as `failed` with the reason.

What happens to a message when a worker dies mid-task: with late acks the message is still
unacknowledged. If only the pool process died (the OOM killer, a crash in native code), the
worker rejects it back to the queue (task_reject_on_worker_lost) and it is delivered again at
once; the claim names the machine and process that made it, so the redelivery sees that process
is gone and takes the call over. If the whole worker died, Redis hands the message out again
after BROKER_VISIBILITY_TIMEOUT_SEC; a redelivery that cannot tell the claimant is dead (another
machine, a process that is still there) is dropped, and the dispatcher sends the call again when
the dead worker's claim runs out.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from psycopg.types.json import Jsonb

from workers.app import app, settings
from workers.audio.codec import AudioDecodeError
from workers.core.jobs import JobContext, claimant_is_gone, periodic_job, process_id
from workers.core.runtime import Runtime, db_connection
from workers.core.settings import Settings
from workers.recognizers import (
    PermanentRecognitionError,
    Recognition,
    RecognizerConfigError,
    TransientRecognitionError,
    build_recognizer,
    forget_process_recognizer,
    process_recognizer,
    run_on_loop,
)

log = logging.getLogger(__name__)

TRANSCRIBE_TASK = "tasks.transcription.transcribe_call"
QUEUE = "transcription"
# Kombu's Redis transport keeps one list per priority step: the queue's name for priority 0,
# then "<name>\x06\x16<step>". Messages sent with a priority land in those.
_PRIORITY_SEP, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)
# Past the hard time limit, a few seconds for Celery to have killed the process.
CLAIM_MARGIN_SEC = 10.0


# --- dispatch ------------------------------------------------------------------------------


def queued_messages(client: redis.Redis, queue: str = QUEUE) -> int:
    """Messages waiting in the queue (not yet taken by a worker): one LLEN per priority list,
    in one round trip.

    Messages a worker has taken sit in kombu's `unacked` hash until acknowledged (late acks:
    until the task ends) and are not counted. With prefetch 1 there is at most one per pool
    process, plus retries waiting out their countdown: a number bounded by the pool, not by
    the backlog. The backlog itself is in PostgreSQL, where nothing is lost."""
    names = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


@dataclass(frozen=True)
class DispatchOutcome:
    sent: int
    queued_before: int
    held_back: bool  # True: the queue was full, nothing was picked


def pick_sql(order: str) -> str:
    direction = "DESC" if order == "newest" else "ASC"
    return f"""
        WITH picked AS (
            SELECT t.call_id
              FROM call_transcription t
              JOIN call_audio a ON a.call_id = t.call_id AND a.state = 'ready'
             WHERE t.state IN ('pending', 'dispatched', 'running')
               AND t.due_at <= now()
               AND t.call_started_at > now() - make_interval(secs => %(max_age)s)
             ORDER BY t.call_started_at {direction}, t.call_id {direction}
             LIMIT %(limit)s
               FOR UPDATE OF t SKIP LOCKED
        )
        UPDATE call_transcription t
           SET state = 'dispatched',
               due_at = now() + make_interval(secs => %(lease)s),
               dispatched_at = now(),
               dispatch_count = t.dispatch_count + 1,
               updated_at = now()
          FROM picked
         WHERE t.call_id = picked.call_id
        RETURNING t.call_id, t.call_started_at
    """


async def mark_dispatched(settings: Settings, limit: int) -> list[int]:
    """Mark up to `limit` due calls as dispatched (committed on return), in dispatch order."""
    async with db_connection() as conn:
        cur = await conn.execute(
            pick_sql(settings.transcribe_dispatch_order),
            {
                "max_age": settings.transcribe_max_age_hours * 3600,
                "limit": limit,
                "lease": settings.transcribe_dispatch_lease_sec,
            },
            # Planned afresh each time: a cached generic plan, made while the tables were
            # small, would hash-join every ready call once they are not.
            prepare=False,
        )
        rows = await cur.fetchall()
    rows.sort(key=lambda r: (r[1], r[0]), reverse=settings.transcribe_dispatch_order == "newest")
    return [r[0] for r in rows]


def publish_transcriptions(settings: Settings, call_ids: Sequence[int]) -> None:
    """One message per call, by task name (routed to the transcription queue), on one
    connection to the broker named by the settings."""
    with app.connection_for_write(settings.redis_url.reveal()) as connection:
        for call_id in call_ids:
            app.send_task(TRANSCRIBE_TASK, kwargs={"call_id": call_id}, connection=connection)


async def dispatch_once(
    settings: Settings,
    redis_client: redis.Redis,
    *,
    ensure_lock: Callable[[], None] = lambda: None,
) -> DispatchOutcome:
    queued = queued_messages(redis_client)
    room = settings.transcribe_queue_max - queued
    if room <= 0:
        return DispatchOutcome(0, queued, True)
    ensure_lock()
    call_ids = await mark_dispatched(settings, min(room, settings.transcribe_dispatch_batch))
    if call_ids:
        # Marked and committed first, sent second: a crash in between is covered by the lease.
        ensure_lock()
        publish_transcriptions(settings, call_ids)
    return DispatchOutcome(len(call_ids), queued, False)


@periodic_job("tasks.transcription.dispatch_ready_calls", rerun_on_trigger=True)
async def dispatch_ready_calls(ctx: JobContext) -> None:
    """Send ready calls to the transcription queue, as many as it has room for."""
    outcome = await dispatch_once(ctx.settings, ctx.runtime.redis, ensure_lock=ctx.ensure_lock)
    s = ctx.settings
    if outcome.held_back:
        log.info(
            "transcription dispatch: queue holds %d messages (TRANSCRIBE_QUEUE_MAX=%d): "
            "nothing sent",
            outcome.queued_before,
            s.transcribe_queue_max,
        )
    elif outcome.sent:
        log.info(
            "transcription dispatch: sent %d calls (%d were queued)",
            outcome.sent,
            outcome.queued_before,
        )


# --- the per-call task ---------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    attempt: int
    prepared_path: str


class Skip(str):
    """Why a delivery does nothing (a duplicate, a call already finished)."""


async def claim_call(
    call_id: int, worker: str, settings: Settings, reclaim: str | None = None
) -> Claim | Skip:
    """Take the call for this worker, or say why not. One transaction."""
    async with db_connection() as conn:
        row = await (
            await conn.execute(
                """SELECT t.state, t.due_at <= now(), t.due_at, t.attempts, t.claimed_by,
                          t.last_error, a.state, a.prepared_path
                     FROM call_transcription t
                     LEFT JOIN call_audio a ON a.call_id = t.call_id
                    WHERE t.call_id = %s
                      FOR UPDATE OF t""",
                (call_id,),
            )
        ).fetchone()
        if row is None:
            return Skip("no such call waiting for transcription (its audio was never ready)")
        state, due, due_at, attempts, claimed_by, last_error, audio_state, prepared = row
        if state == "done":
            return Skip("already transcribed: duplicate delivery dropped")
        if state == "failed":
            return Skip(f"failed for good before: {last_error}")
        if state == "running" and not due and claimed_by != reclaim:
            if not claimant_is_gone(claimed_by):
                return Skip(
                    f"claimed by {claimed_by} until {due_at:%H:%M:%S}: duplicate delivery"
                    " dropped (sent again by the dispatcher if that claim runs out)"
                )
            log.warning(
                "call %s: its claimant %s is gone; taking the call over", call_id, claimed_by
            )
        if audio_state != "ready" or not prepared:
            await conn.execute(
                "UPDATE call_transcription SET state = 'pending', due_at = now(),"
                " updated_at = now() WHERE call_id = %s",
                (call_id,),
            )
            return Skip(f"its audio is not ready (state {audio_state}): back to pending")
        if attempts >= settings.transcribe_max_attempts:
            reason = f"gave up after {attempts} attempts; last error: {last_error or 'none'}"
            await _set_failed(conn, call_id, reason)
            return Skip(reason)
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'running', attempts = attempts + 1, claimed_by = %s,
                      claimed_at = now(), due_at = now() + make_interval(secs => %s),
                      updated_at = now()
                WHERE call_id = %s""",
            (worker, settings.transcribe_time_limit_sec + CLAIM_MARGIN_SEC, call_id),
        )
        return Claim(attempts + 1, prepared)


async def store_transcript(
    call_id: int, backend: str, result: Recognition, processing_sec: float
) -> bool:
    """The transcript and `done`, in one transaction. False: the call had one already."""
    async with db_connection() as conn:
        cur = await conn.execute(
            """INSERT INTO transcripts (call_id, text, segments, language, backend, model,
                                        confidence, audio_duration_sec, processing_sec)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (call_id) DO NOTHING
               RETURNING id""",
            (
                call_id,
                result.text,
                Jsonb([s.as_json() for s in result.segments]),
                result.language,
                backend,
                result.model,
                result.confidence,
                result.audio_duration_sec,
                round(processing_sec, 3),
            ),
        )
        inserted = await cur.fetchone() is not None
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'done', due_at = NULL, finished_at = now(), last_error = NULL,
                      updated_at = now()
                WHERE call_id = %s""",
            (call_id,),
        )
    return inserted


async def _set_failed(conn: psycopg.AsyncConnection[Any], call_id: int, reason: str) -> None:
    await conn.execute(
        """UPDATE call_transcription
              SET state = 'failed', due_at = NULL, finished_at = now(), last_error = %s,
                  updated_at = now()
            WHERE call_id = %s""",
        (reason[:2000], call_id),
    )


async def record_failure(call_id: int, reason: str) -> None:
    async with db_connection() as conn:
        await _set_failed(conn, call_id, reason)


async def release_for_retry(
    call_id: int, worker: str, reason: str, countdown: float, settings: Settings
) -> None:
    """Give the claim back: the retry message takes it. Should that message be lost, the call is
    due for the dispatcher once the countdown and a dispatch lease have passed."""
    async with db_connection() as conn:
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'dispatched', last_error = %s, updated_at = now(),
                      due_at = now() + make_interval(secs => %s)
                WHERE call_id = %s AND state = 'running' AND claimed_by = %s""",
            (reason[:2000], countdown + settings.transcribe_dispatch_lease_sec, call_id, worker),
        )


def backoff_sec(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter, at least what the service asked for, capped."""
    base = settings.transcribe_retry_backoff_sec * 2 ** max(attempt - 1, 0)
    wait = base * random.uniform(0.8, 1.2)
    if retry_after is not None:
        wait = max(wait, retry_after)
    # Rounded for the logs, then capped: rounding must not lift a wait past the cap.
    return min(round(wait, 1), settings.transcribe_retry_backoff_max_sec)


@app.task(
    name=TRANSCRIBE_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    # The database counts attempts (TRANSCRIBE_MAX_ATTEMPTS), across retries and re-dispatches.
    max_retries=None,
    soft_time_limit=settings.transcribe_soft_time_limit_sec,
    time_limit=settings.transcribe_time_limit_sec,
)
def transcribe_call(self: Task, call_id: int, reclaim: str | None = None) -> str:
    """Transcribe one call whose audio is ready; at most one transcript, whatever is delivered."""
    rt = Runtime.current()
    s = rt.settings
    worker = process_id(self)
    try:
        claim = run_on_loop(rt.loop, claim_call(call_id, worker, s, reclaim))
    except (psycopg.Error, OSError) as exc:
        # Nothing claimed: try again later (the dispatcher's lease covers a lost retry too).
        # A retry of our own claim keeps `reclaim`: after a database outage the claim may still
        # name this process, and without it the retry would drop the call as a duplicate.
        countdown = backoff_sec(self.request.retries + 1, s)
        log.warning("call %s: cannot claim (%s); retry in %gs", call_id, exc, countdown)
        raise self.retry(
            countdown=countdown, kwargs={"call_id": call_id, "reclaim": reclaim}
        ) from None
    if isinstance(claim, Skip):
        log.info("call %s: %s", call_id, claim)
        return "skipped"

    backend = s.transcribe_backend
    reason: str
    retry_after: float | None = None
    started = time.perf_counter()
    try:
        audio = Path(s.audio_store_dir) / claim.prepared_path
        if not audio.is_file():
            raise FileNotFoundError(2, "no such file", str(audio))
        result = process_recognizer(s).transcribe(audio, name=f"call-{call_id}.flac")
        elapsed = time.perf_counter() - started
        inserted = run_on_loop(rt.loop, store_transcript(call_id, backend, result, elapsed))
    except (PermanentRecognitionError, AudioDecodeError, FileNotFoundError) as exc:
        reason = _reason(exc)
        log.error("call %s: transcription failed for good: %s", call_id, reason)
        _try(rt, record_failure(call_id, reason), call_id)
        return "failed"
    except TransientRecognitionError as exc:
        reason, retry_after = _reason(exc), exc.retry_after
    except SoftTimeLimitExceeded:
        reason = f"soft time limit ({s.transcribe_soft_time_limit_sec:g}s) reached"
    except Exception as exc:
        # A database outage, or a fault of ours: counted against the attempts, then failed.
        log.exception("call %s: transcription attempt %d failed", call_id, claim.attempt)
        reason = _reason(exc)
        forget_process_recognizer()
    else:
        seconds = result.audio_duration_sec or 0.0
        if inserted:
            log.info(
                "call %s transcribed by %s in %.2fs (%.1fs of audio, RTF %.2f, %d words)",
                call_id,
                result.model,
                elapsed,
                seconds,
                elapsed / seconds if seconds else 0.0,
                len(result.text.split()),
            )
        else:
            log.info("call %s: another worker stored its transcript first; kept that", call_id)
        return "done"

    if claim.attempt >= s.transcribe_max_attempts:
        reason = f"gave up after {claim.attempt} attempts; last error: {reason}"
        log.error("call %s: %s", call_id, reason)
        _try(rt, record_failure(call_id, reason), call_id)
        return "failed"
    countdown = backoff_sec(claim.attempt, s, retry_after)
    log.warning(
        "call %s: attempt %d/%d failed (%s); retry in %gs",
        call_id,
        claim.attempt,
        s.transcribe_max_attempts,
        reason,
        countdown,
    )
    _try(rt, release_for_retry(call_id, worker, reason, countdown, s), call_id)
    raise self.retry(countdown=countdown, kwargs={"call_id": call_id, "reclaim": worker})


def _try(rt: Runtime, coro: Any, call_id: int) -> None:
    """Bookkeeping that must not turn one failure into another (the leases cover its loss)."""
    try:
        run_on_loop(rt.loop, coro)
    except Exception as exc:
        log.error("call %s: could not record the outcome: %s", call_id, _reason(exc))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        text = f"prepared audio is missing: {exc.filename}"
    elif isinstance(exc, AudioDecodeError):
        text = f"prepared audio cannot be decoded: {exc}"
    elif not isinstance(exc, PermanentRecognitionError | TransientRecognitionError):
        text = f"{type(exc).__name__}: {text}"
    return text[:2000]


# --- start-up check ------------------------------------------------------------------------


@signals.worker_init.connect
def _check_recognizer_at_start(sender: Any = None, **_: Any) -> None:
    """A worker that consumes the transcription queue builds its recogniser once before it
    starts: a misconfigured backend stops it with the reason, instead of failing every call."""
    try:
        queues = sender.app.amqp.queues.consume_from
    except AttributeError:
        return
    if QUEUE not in queues:
        return
    try:
        recognizer = build_recognizer(settings)
    except RecognizerConfigError as exc:
        raise SystemExit(
            f"bcfy: cannot start: TRANSCRIBE_BACKEND={settings.transcribe_backend}: {exc}"
        ) from None
    log.info("transcription: recogniser %s (%s) ready", recognizer.backend, recognizer.model)
