"""The production Celery app plus small periodic jobs whose behaviour the tests control.

Started as `celery -A tests.jobapp worker|beat`. The jobs report what they did through Redis
(`test:*` keys), so a test can see runs start, not only finish. Their beat schedule comes from
TEST_BEAT_JOBS: "name:interval,name:interval".
"""

from __future__ import annotations

import asyncio
import os
import time

import redis.asyncio as aioredis

from beat_schedule import beat_entry
from workers.app import app, settings
from workers.jobs import JobContext, periodic_job

__all__ = ["app"]


async def _note(key: str, ctx: JobContext) -> None:
    client = aioredis.Redis.from_url(ctx.settings.redis_url.reveal())
    try:
        await client.rpush(key, f"{ctx.lock.token} {time.time():.3f}")
    finally:
        await client.aclose()


@periodic_job("tests.jobs.sleeper")
async def sleeper(ctx: JobContext) -> None:
    """Notes its start, sleeps TEST_SLEEP_SEC, checks it still holds its lock, notes its end."""
    await _note("test:starts", ctx)
    await asyncio.sleep(float(os.environ.get("TEST_SLEEP_SEC", "0")))
    ctx.ensure_lock()
    await _note("test:ends", ctx)


@periodic_job("tests.jobs.failing")
async def failing(ctx: JobContext) -> None:
    await _note("test:starts", ctx)
    raise RuntimeError("deliberate failure in the job body")


@periodic_job("tests.jobs.rerunnable", rerun_on_trigger=True)
async def rerunnable(ctx: JobContext) -> None:
    await _note("test:starts", ctx)
    await asyncio.sleep(float(os.environ.get("TEST_SLEEP_SEC", "0")))
    await _note("test:ends", ctx)


app.conf.beat_schedule = {
    name: beat_entry(f"tests.jobs.{name}", float(interval), settings.job_misfire_grace_sec)
    for name, interval in (
        item.split(":") for item in os.environ.get("TEST_BEAT_JOBS", "").split(",") if item
    )
}
