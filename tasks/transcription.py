"""Transcription: dispatch prepared calls to the transcription pool and transcribe them."""

from __future__ import annotations

from workers.jobs import JobContext, periodic_job


@periodic_job("tasks.transcription.dispatch_ready_calls", rerun_on_trigger=True)
async def dispatch_ready_calls(ctx: JobContext) -> None:
    """Send ready calls to the transcription queue. (Filled by the transcription issue.)"""
