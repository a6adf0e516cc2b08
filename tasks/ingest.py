"""Ingest: poll the followed Broadcastify playlists for new calls (every INGEST_INTERVAL_SEC)."""

from __future__ import annotations

from workers.jobs import JobContext, periodic_job


@periodic_job("tasks.ingest.poll_followed_playlists")
async def poll_followed_playlists(ctx: JobContext) -> None:
    """Poll each followed playlist once and store its new calls. (Filled by the ingestion issue.)"""
