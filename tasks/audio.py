"""Audio: claim pending calls, download, validate, convert and store their audio."""

from __future__ import annotations

from workers.jobs import JobContext, periodic_job


@periodic_job("tasks.audio.process_pending_audio", rerun_on_trigger=True)
async def process_pending_audio(ctx: JobContext) -> None:
    """Claim a batch of pending calls and prepare their audio. (Filled by the audio issue.)"""
