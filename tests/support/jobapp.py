"""The production Celery app plus small periodic jobs whose behaviour the tests control.

Started as `celery -A tests.support.jobapp worker|beat`. The jobs report what they did through Redis
(`test:*` keys), so a test can see runs start, not only finish. Their beat schedule comes from
TEST_BEAT_JOBS: "name:interval,name:interval".
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from celery.exceptions import SoftTimeLimitExceeded

from beat_schedule import beat_entry
from workers.app import app, configured_settings
from workers.core.jobs import JobContext, periodic_job

__all__ = ["app"]


async def _note(key: str, ctx: JobContext) -> None:
    client = aioredis.Redis.from_url(ctx.settings.services.redis_url.reveal())
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


@periodic_job("tests.jobs.stubborn")
async def stubborn(ctx: JobContext) -> None:
    """Notes its start; if the test pushed a number of seconds to `test:block`, blocks its event
    loop that long (time.sleep: the asyncio deadline cannot fire) and shrugs off Celery's soft
    time limit (noting `test:soft`), as a body stuck in C would; notes its end."""
    await _note("test:starts", ctx)
    client = aioredis.Redis.from_url(ctx.settings.services.redis_url.reveal())
    try:
        block = await client.lpop("test:block")
    finally:
        await client.aclose()
    if isinstance(block, bytes | str):  # (lpop without a count: one item or None)
        until = time.monotonic() + float(block)
        while time.monotonic() < until:
            try:
                time.sleep(0.05)  # noqa: ASYNC251 (blocking the loop is the point)
            except SoftTimeLimitExceeded:
                # Noted without awaiting: an await would let the loop fire its deadline.
                noted = redis.Redis.from_url(ctx.settings.services.redis_url.reveal())
                noted.rpush("test:soft", ctx.lock.token)
                noted.close()
    await _note("test:ends", ctx)


@periodic_job("tests.jobs.whoami")
async def whoami(ctx: JobContext, **_: object) -> None:
    """Notes `<process pid> <PostgreSQL backend pid>` of the connection it borrowed, then waits
    (up to 30 s) until two runs have noted theirs, so that two runs occupy two pool processes."""
    async with ctx.connection() as conn:
        (backend,) = await (await conn.execute("SELECT pg_backend_pid()")).fetchone() or (0,)
    client = aioredis.Redis.from_url(ctx.settings.services.redis_url.reveal())
    try:
        await client.rpush("test:whoami", f"{os.getpid()} {backend}")
        until = time.monotonic() + 30
        while await client.llen("test:whoami") < 2 and time.monotonic() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@app.on_after_configure.connect
def _test_beat_schedule(sender: Any, **_: Any) -> None:
    grace = configured_settings().jobs.misfire_grace_sec
    sender.conf.beat_schedule = {
        name: beat_entry(f"tests.jobs.{name}", float(interval), grace)
        for name, interval in (
            item.split(":") for item in os.environ.get("TEST_BEAT_JOBS", "").split(",") if item
        )
    }
