"""The ingest jobs Celery runs, under their fixed task names, and the triggers they send.

`poll_followed_playlists` (every INGEST_INTERVAL_SEC) polls the followed playlists
(`tasks.ingest.polling`), then triggers the audio job if anything new was stored and
`backfill_gaps` while gaps are due; `backfill_gaps` (triggered only) reads the recorded gaps
(`tasks.ingest.backfill`) and triggers the audio job if it stored anything new.
"""

from __future__ import annotations

import asyncio
import logging

from tasks.ingest.backfill import gaps_due, read_due_gaps
from tasks.ingest.polling import poll_followed
from workers.app import app
from workers.clients.broadcastify import ConfigurationError
from workers.core.jobs import JobContext, periodic_job

log = logging.getLogger(__name__)

POLL_JOB = "tasks.ingest.poll_followed_playlists"
BACKFILL_JOB = "tasks.ingest.backfill_gaps"
AUDIO_JOB = "tasks.audio.process_pending_audio"


class PollsFailed(Exception):
    """Some playlists could not be polled (the others were)."""


class BackfillIncomplete(Exception):
    """Some windows could not be read; they stay recorded and are tried again."""


@periodic_job(POLL_JOB)
async def poll_followed_playlists(ctx: JobContext) -> None:
    """Poll each followed playlist once and store its new calls."""
    outcomes = await poll_followed(ctx, ctx.runtime.bcfy_api)
    ctx.ensure_lock()  # a poll that found the lock lost stopped: so does the run
    if any(o.new for o in outcomes):
        await _trigger(AUDIO_JOB)
    if await gaps_due(ctx):
        await _trigger(BACKFILL_JOB)
    failures = [o for o in outcomes if o.error is not None]
    if failures:
        config = next((o.error for o in failures if isinstance(o.error, ConfigurationError)), None)
        summary = "; ".join(f"{o.playlist_uuid}: {o.error}" for o in failures[:5])
        message = f"{len(failures)} of {len(outcomes)} playlists failed: {summary}"
        if config is not None:
            raise ConfigurationError(message)
        raise PollsFailed(message)


@periodic_job(BACKFILL_JOB, rerun_on_trigger=True)
async def backfill_gaps(ctx: JobContext) -> None:
    """Recover recorded gaps from group_archives, oldest windows first, for at most
    INGEST_BACKFILL_BUDGET_SEC; what is left waits for the next trigger (each poll run sends
    one while gaps remain)."""
    new, errors = await read_due_gaps(ctx, ctx.runtime.bcfy_api)
    if new:
        await _trigger(AUDIO_JOB)
    if errors:
        raise BackfillIncomplete(f"{len(errors)} archive reads failed: " + "; ".join(errors[:5]))


async def _trigger(task_name: str) -> None:
    """Send a job its trigger by name (a Redis publish: off the event loop)."""
    try:
        await asyncio.to_thread(app.send_task, task_name)
    except Exception as exc:
        log.error("could not trigger %s: %s", task_name, exc)
