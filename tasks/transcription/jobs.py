"""The transcription stage's Celery entry points. Their names are part of the deployment
(beat's schedule, the routes, queued messages): keep them.

The task (`transcribe_call`, on the transcription pool: late acks, prefetch 1):
  1. claims the call in one transaction (tasks.transcription.claims);
  2. recognises it, directly in the pool process (CPU work; the openai backend drives its HTTP
     request on the process's event loop), holding no database connection;
  3. stores the transcript, writes its alert matches to the outbox and marks the call done, in
     one transaction; then, if it matched, triggers the notify pool.
A failure is retried or recorded as `failed` as tasks.transcription.policy decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from enum import StrEnum
from typing import Any

import psycopg
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from tasks.transcription.claims import (
    Skip,
    claim_call,
    record_failure,
    release_for_retry,
    store_transcript,
)
from tasks.transcription.dispatch import TRANSCRIBE_TASK, dispatch_once
from tasks.transcription.policy import (
    PERMANENT_ERRORS,
    GiveUp,
    after_failed_attempt,
    reason,
    retry_wait,
)
from workers.alerts.delivery import trigger_alert_delivery
from workers.app import app
from workers.audio.store import StoreError, store_for
from workers.core.identity import worker_identity
from workers.core.jobs import JobContext, periodic_job
from workers.core.runtime import Runtime
from workers.recognizers import (
    TransientRecognitionError,
    forget_process_recognizer,
    pool_processes,
    process_recognizer,
)

log = logging.getLogger(__name__)


class TranscriptionOutcome(StrEnum):
    """What a delivery of transcribe_call came to (its return value; a retry raises instead)."""

    DONE = "done"  # transcribed (by this delivery, or another stored it first)
    FAILED = "failed"  # for good, with the reason in call_transcription.last_error
    SKIPPED = "skipped"  # nothing to do: a duplicate, a call already finished, audio not ready


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
            s.transcription.queue_max,
        )
    elif outcome.sent:
        log.info(
            "transcription dispatch: sent %d calls (%d were queued)",
            outcome.sent,
            outcome.queued_before,
        )


@app.task(
    name=TRANSCRIBE_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    # The database counts attempts (TRANSCRIBE_MAX_ATTEMPTS), across retries and re-dispatches.
    max_retries=None,
    # Time limits (TRANSCRIBE_SOFT_TIME_LIMIT_SEC, TRANSCRIBE_TIME_LIMIT_SEC): beat_schedule.JOBS.
)
def transcribe_call(self: Task, call_id: int, reclaim: str | None = None) -> TranscriptionOutcome:
    """Transcribe one call whose audio is ready; at most one transcript, whatever is delivered."""
    rt = Runtime.current()
    s = rt.settings
    worker = worker_identity()
    try:
        claim = rt.run(claim_call(call_id, worker, s, reclaim))
    except (psycopg.Error, OSError) as exc:
        # Nothing claimed: try again later (the dispatcher's lease covers a lost retry too).
        # A retry of our own claim keeps `reclaim`: after a database outage the claim may still
        # name this process, and without it the retry would drop the call as a duplicate.
        countdown = retry_wait(self.request.retries + 1, s)
        log.warning("call %s: cannot claim (%s); retry in %gs", call_id, exc, countdown)
        raise self.retry(
            countdown=countdown, kwargs={"call_id": call_id, "reclaim": reclaim}
        ) from None
    if isinstance(claim, Skip):
        log.info("call %s: %s", call_id, claim)
        return TranscriptionOutcome.SKIPPED

    why: str
    retry_after: float | None = None
    started = time.perf_counter()
    store = store_for(s)
    try:
        # A local copy (S3: fetched into AUDIO_WORK_DIR), its sha256 checked: never a path
        # assumed to be shared with the audio pool's host.
        audio = rt.run(store.fetch(claim.prepared_path, claim.prepared_sha256, call_id))
        recognizer = process_recognizer(s.transcription, pool_processes=pool_processes(s.pools))
        try:
            result = recognizer.transcribe(audio, name=f"call-{call_id}.flac")
        finally:
            store.release(audio)
        elapsed = time.perf_counter() - started
        stored = rt.run(
            store_transcript(call_id, recognizer.backend, result, elapsed, s.alerts.max_per_minute)
        )
    except PERMANENT_ERRORS as exc:
        why = reason(exc)
        log.error("call %s: transcription failed for good: %s", call_id, why)
        _try(rt, record_failure(call_id, why), call_id)
        return TranscriptionOutcome.FAILED
    except TransientRecognitionError as exc:
        why, retry_after = reason(exc), exc.retry_after
    except SoftTimeLimitExceeded:
        why = f"soft time limit ({s.transcription.soft_time_limit_sec:g}s) reached"
    except StoreError as exc:
        # The store could not be read (down, refusing): retried; the recogniser is fine.
        why = f"audio store: {exc}"
    except Exception as exc:
        # A database outage, or a fault of ours: counted against the attempts, then failed.
        log.exception("call %s: transcription attempt %d failed", call_id, claim.attempt)
        why = reason(exc)
        forget_process_recognizer()
    else:
        seconds = result.audio_duration_sec or 0.0
        if stored.alerts_due:
            trigger_alert_delivery(call_id)
        if stored.inserted:
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
        return TranscriptionOutcome.DONE

    next_step = after_failed_attempt(claim.attempt, why, s, retry_after)
    if isinstance(next_step, GiveUp):
        log.error("call %s: %s", call_id, next_step.reason)
        _try(rt, record_failure(call_id, next_step.reason), call_id)
        return TranscriptionOutcome.FAILED
    countdown = next_step.countdown
    log.warning(
        "call %s: attempt %d/%d failed (%s); retry in %gs",
        call_id,
        claim.attempt,
        s.transcription.max_attempts,
        why,
        countdown,
    )
    _try(rt, release_for_retry(call_id, worker, why, countdown, s), call_id)
    raise self.retry(countdown=countdown, kwargs={"call_id": call_id, "reclaim": worker})


def _try(rt: Runtime, coro: Coroutine[Any, Any, None], call_id: int) -> None:
    """Bookkeeping that must not turn one failure into another (the leases cover its loss)."""
    try:
        rt.run(coro)
    except Exception as exc:
        log.error("call %s: could not record the outcome: %s", call_id, reason(exc))
