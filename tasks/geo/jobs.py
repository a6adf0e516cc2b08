"""The geo stage's Celery entry point. Its name is part of the deployment (beat's schedule, the
routes, queued messages): keep it."""

from __future__ import annotations

from tasks.geo.refresh import refresh
from workers.core.jobs import JobContext, periodic_job


@periodic_job("tasks.geo.refresh_geo_data")
async def refresh_geo_data(ctx: JobContext) -> None:
    """Refresh the geographic reference tables for the configured scope."""
    await refresh(ctx)
