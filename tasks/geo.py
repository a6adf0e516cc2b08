"""Geo refresh: countries, states and counties from the service (daily)."""

from __future__ import annotations

from workers.jobs import JobContext, periodic_job


@periodic_job("tasks.geo.refresh_geo_data")
async def refresh_geo_data(ctx: JobContext) -> None:
    """Refresh the geographic reference tables. (Filled by the ingestion issue.)"""
