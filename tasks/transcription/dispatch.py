"""Dispatch: hand ready calls to the transcription queue, as many as it has room for.

The dispatcher (`jobs.dispatch_ready_calls`, singleton, every TRANSCRIPTION_DISPATCH_INTERVAL_SEC
and at once when the audio stage triggers it):
  1. counts the messages waiting in the transcription queue (LLEN: O(1)) and sends nothing
     while there are TRANSCRIBE_QUEUE_MAX of them (backpressure);
  2. marks up to TRANSCRIBE_DISPATCH_BATCH due calls `dispatched`, with a lease, and commits;
  3. then sends one `transcribe_call` message per call. A crash between 2 and 3 loses nothing:
     when the lease runs out the call is due again and sent again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from workers.app import app
from workers.core.runtime import db_connection
from workers.core.settings import Settings

# The per-call task's name, by which dispatch sends it (tasks.transcription.jobs declares it).
TRANSCRIBE_TASK = "tasks.transcription.transcribe_call"
QUEUE = "transcription"
# Kombu's Redis transport keeps one list per priority step: the queue's name for priority 0,
# then "<name>\x06\x16<step>". Messages sent with a priority land in those.
_PRIORITY_SEP, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)


def queued_messages(client: redis.Redis, queue: str = QUEUE) -> int:
    """Messages waiting in the queue (not yet taken by a worker): one LLEN per priority list,
    in one round trip.

    Messages a worker has taken sit in kombu's `unacked` hash until acknowledged (late acks:
    until the task ends) and are not counted. With prefetch 1 there is at most one per pool
    process, plus retries waiting out their countdown: a number bounded by the pool, not by
    the backlog. The backlog itself is in PostgreSQL, where nothing is lost."""
    names = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


@dataclass(frozen=True)
class DispatchOutcome:
    sent: int
    queued_before: int
    held_back: bool  # True: the queue was full, nothing was picked


def pick_sql(order: str) -> str:
    direction = "DESC" if order == "newest" else "ASC"
    return f"""
        WITH picked AS (
            SELECT t.call_id
              FROM call_transcription t
              JOIN call_audio a ON a.call_id = t.call_id AND a.state = 'ready'
             WHERE t.state IN ('pending', 'dispatched', 'running')
               AND t.due_at <= now()
               AND t.call_started_at > now() - make_interval(secs => %(max_age)s)
             ORDER BY t.call_started_at {direction}, t.call_id {direction}
             LIMIT %(limit)s
               FOR UPDATE OF t SKIP LOCKED
        )
        UPDATE call_transcription t
           SET state = 'dispatched',
               due_at = now() + make_interval(secs => %(lease)s),
               dispatched_at = now(),
               dispatch_count = t.dispatch_count + 1,
               updated_at = now()
          FROM picked
         WHERE t.call_id = picked.call_id
        RETURNING t.call_id, t.call_started_at
    """


async def mark_dispatched(settings: Settings, limit: int) -> list[int]:
    """Mark up to `limit` due calls as dispatched (committed on return), in dispatch order."""
    async with db_connection() as conn:
        cur = await conn.execute(
            pick_sql(settings.transcription.dispatch_order),
            {
                "max_age": settings.transcription.max_age_hours * 3600,
                "limit": limit,
                "lease": settings.transcription.dispatch_lease_sec,
            },
            # Planned afresh each time: a cached generic plan, made while the tables were
            # small, would hash-join every ready call once they are not.
            prepare=False,
        )
        rows = await cur.fetchall()
    rows.sort(key=lambda r: (r[1], r[0]), reverse=settings.transcription.dispatch_order == "newest")
    return [r[0] for r in rows]


def publish_transcriptions(settings: Settings, call_ids: Sequence[int]) -> None:
    """One message per call, by task name (routed to the transcription queue), on one
    connection to the broker named by the settings."""
    with app.connection_for_write(settings.services.redis_url.reveal()) as connection:
        for call_id in call_ids:
            app.send_task(TRANSCRIBE_TASK, kwargs={"call_id": call_id}, connection=connection)


async def dispatch_once(
    settings: Settings,
    redis_client: redis.Redis,
    *,
    ensure_lock: Callable[[], None] = lambda: None,
) -> DispatchOutcome:
    queued = queued_messages(redis_client)
    room = settings.transcription.queue_max - queued
    if room <= 0:
        return DispatchOutcome(0, queued, True)
    ensure_lock()
    call_ids = await mark_dispatched(settings, min(room, settings.transcription.dispatch_batch))
    if call_ids:
        # Marked and committed first, sent second: a crash in between is covered by the lease.
        ensure_lock()
        publish_transcriptions(settings, call_ids)
    return DispatchOutcome(len(call_ids), queued, False)
