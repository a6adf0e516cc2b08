"""The maintenance job's Celery entry point (its name is part of the deployment: keep it) and
one run in the order the package's docstring gives, callable on its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tasks.maintenance.fold import fold_counters
from tasks.maintenance.rows import prune
from tasks.maintenance.run import OutOfTime, Report, Run
from tasks.maintenance.trash import empty_trash
from workers.core.jobs import JobContext, periodic_job
from workers.core.settings import Settings

log = logging.getLogger(__name__)


@periodic_job("tasks.maintenance.prune_history")
async def prune_history(ctx: JobContext) -> None:
    """Prune history after its retention settings (see the package's docstring)."""
    budget = 0.8 * ctx.settings.jobs.soft_time_limit_sec
    report = await run_maintenance(
        ctx.settings, deadline=time.monotonic() + budget, ensure_lock=ctx.ensure_lock
    )
    log.info(
        "maintenance: pruned %s; %d files removed; counters folded %s%s",
        ", ".join(f"{k} {n}" for k, n in report.pruned.items()) or "nothing",
        report.files_removed,
        ", ".join(f"{k} {n}" for k, n in report.folded.items() if n) or "(none new)",
        "; time budget spent, the rest next run" if report.out_of_time else "",
    )


async def run_maintenance(
    settings: Settings,
    *,
    deadline: float | None = None,
    ensure_lock: Callable[[], None] = lambda: None,
) -> Report:
    """One maintenance pass (the job's body, callable on its own). `deadline` is a
    time.monotonic() value: no new batch starts after it."""
    run = Run(settings, deadline, ensure_lock)
    try:
        await empty_trash(run)
        await fold_counters(run)
        await prune(run)
        await empty_trash(run)
    except OutOfTime:
        run.report.out_of_time = True
    return run.report
