"""The notify pool's Celery entry points. Their names are part of the deployment (beat's
schedule, the routes, queued messages): keep them.

  deliver_alerts  sends due deliveries (triggered by transcription and by the sweep); any number
                  may run at once, on any host: each claims its own deliveries
  sweep_outbox    beat's periodic sweep (a singleton job): dead workers' claims, summaries of
                  throttled bursts, and a trigger for anything due
"""

from __future__ import annotations

import logging
import math
from typing import Any

from celery import Task, signals

from workers.alerts.delivery import DELIVER_TASK, deliver_due, sweep_outbox
from workers.alerts.targets import quiet_target_logs
from workers.app import app
from workers.core.identity import worker_identity
from workers.core.jobs import JobContext, periodic_job
from workers.core.runtime import Runtime

log = logging.getLogger(__name__)


@signals.celeryd_after_setup.connect
def _load_apprise_in_the_notify_pool(sender: str, instance: Any, **_: object) -> None:
    """Apprise takes about half a second to import: a notify worker imports it before it forks
    its pool, so that no alert waits for it (other pools never load it)."""
    if "notify" in (instance.app.amqp.queues.consume_from or {}):
        import apprise  # noqa: F401


@app.task(
    name=DELIVER_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    # Time limits: beat_schedule.JOBS (the periodic jobs' defaults).
)
def deliver_alerts(self: Task) -> dict[str, int]:
    """Send what is due; each delivery claimed, sent and recorded on its own."""
    quiet_target_logs()
    rt = Runtime.current()
    s = rt.settings
    counts = rt.run(
        deliver_due(s.alerts, rt.http, worker_identity(), s.jobs.soft_time_limit_sec / 2)
    )
    if counts:
        log.info("alerts: %s", ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return counts


@periodic_job("tasks.alerts.sweep_outbox")
async def sweep_alert_outbox(ctx: JobContext) -> None:
    """Take back dead workers' claims, sum up throttled bursts, trigger what is due."""
    outcome = await sweep_outbox(ctx.settings.alerts)
    if outcome.summaries:
        log.info("alerts: %d throttled bursts summed up", outcome.summaries)
    if outcome.due:
        s = ctx.settings
        # One trigger per batch of due deliveries, at most one per pool process.
        batches = math.ceil(outcome.due / s.alerts.send_concurrency)
        for _ in range(min(batches, s.pools.notify_concurrency)):
            app.send_task(DELIVER_TASK)
