"""The audio stage's Celery entry points, their names fixed ("tasks.audio.…"), on the `audio` queue.

  process_pending_audio   the claim pass: periodic, and triggered when ingest stores calls
  prepare_calls           a handful of claimed calls, prepared on whichever pool process is free

The package's docstring (tasks/audio/__init__.py) tells how they work together.
"""

from __future__ import annotations

import asyncio
import logging

from celery import Task

from tasks.audio.claims import (
    UNCLAIM,
    calls_per_task,
    claim_pending_calls,
    fail_exhausted_leases,
    split_evenly,
)
from tasks.audio.preparation import CallPreparer, forget_call_ids, stale_temp_age
from workers.app import app
from workers.audio.store import store_for
from workers.core.identity import unique_token, worker_identity
from workers.core.jobs import JobContext, periodic_job
from workers.core.runtime import Runtime

log = logging.getLogger(__name__)

CLAIM_JOB = "tasks.audio.process_pending_audio"
PREPARE_TASK = "tasks.audio.prepare_calls"
# The transcription stage's dispatcher, triggered by name (it belongs to tasks.transcription).
TRANSCRIPTION_DISPATCH = "tasks.transcription.dispatch_ready_calls"
# Set by a pass that found the in-flight cap reached; the next task to finish takes it and asks
# for a pass, since it has just made room.
CLAIM_WANTED_KEY = "bcfy:audio:claim-wanted"


@periodic_job(CLAIM_JOB, rerun_on_trigger=True)
async def process_pending_audio(ctx: JobContext) -> None:
    """Claim a batch of due calls and hand them to the audio pool."""
    s = ctx.settings
    loop = asyncio.get_running_loop()
    swept = await loop.run_in_executor(None, store_for(s).work.sweep_temps, stale_temp_age(s))
    if swept:
        log.warning("audio: removed %d abandoned temporary files", swept)
    owner = unique_token()  # a claim's name: who made it, unique to this pass
    async with ctx.connection() as conn:
        lost = await fail_exhausted_leases(conn, s)
        claim = await claim_pending_calls(conn, s, owner)
        ctx.ensure_lock()  # raising here rolls the claim back
    if claim.room == 0:
        ctx.runtime.redis.set(CLAIM_WANTED_KEY, owner, ex=max(1, int(s.audio.lease_sec)))
    if lost:
        log.warning(
            "audio: %d calls failed: their worker died on every attempt: %s", len(lost), lost
        )
        await forget_call_ids(store_for(s), lost)
    if not claim.call_ids:
        return
    chunks = split_evenly(claim.call_ids, calls_per_task(s))
    sent = 0
    try:
        for chunk in chunks:
            # The first task of a full claim asks for the next pass as it starts, so the next
            # batch is queued while this one is worked on (one request per batch, not per task).
            more = claim.full and sent == 0
            app.send_task(PREPARE_TASK, kwargs={"call_ids": chunk, "owner": owner, "more": more})
            sent += 1
    except Exception:
        unsent = [c for chunk in chunks[sent:] for c in chunk]
        async with ctx.connection() as conn:
            await conn.execute(UNCLAIM, {"ids": unsent, "owner": owner})
        log.exception("audio: could not send %d claimed calls to the pool; released", len(unsent))
        raise
    log.info(
        "audio: claimed %d calls as %s, sent as %d tasks%s",
        len(claim.call_ids),
        owner,
        len(chunks),
        " (more waiting)" if claim.full else "",
    )


@app.task(
    name=PREPARE_TASK,
    bind=True,
    ignore_result=True,
    # Acked when done: a worker lost mid-task has the message delivered again, and the calls
    # still leased to this claim are then prepared by the next process (others are skipped).
    acks_late=True,
    # Time limits: beat_schedule.JOBS. The asyncio deadline at JOB_SOFT_TIME_LIMIT_SEC
    # cancels the calls (their leases then run out and they are claimed again).
)
def prepare_calls(self: Task, call_ids: list[int], owner: str, more: bool = False) -> dict:
    """Prepare a few claimed calls at once; then hand ready ones to transcription."""
    if more:
        app.send_task(CLAIM_JOB)
    rt = Runtime.current()
    worker = worker_identity()
    preparer = CallPreparer(rt.settings, rt.http, owner, worker)
    outcome = rt.run(asyncio.wait_for(preparer.run(call_ids), rt.settings.jobs.soft_time_limit_sec))
    if outcome.ready:
        app.send_task(TRANSCRIPTION_DISPATCH)
    if rt.redis.delete(CLAIM_WANTED_KEY):
        app.send_task(CLAIM_JOB)  # a pass found no room; this task has just made some
    log.info(
        "audio: %d calls: %d ready, %d to retry, %d failed, %d lease lost, %d skipped%s",
        len(call_ids),
        outcome.ready,
        outcome.retry,
        outcome.failed,
        outcome.lease_lost,
        outcome.skipped,
        f", {outcome.unrecorded} not recorded" if outcome.unrecorded else "",
    )
    return outcome.__dict__
