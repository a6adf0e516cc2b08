"""Back-fill: the gaps the live endpoint can no longer serve, read from group_archives.

A gap is recorded in bcfy_backfill, one row per group of the playlist, by the poll that finds
its cursor too old (`tasks.ingest.polling`). The back-fill job (`tasks.ingest.jobs`) then reads
each gap in windows of at most INGEST_BACKFILL_WINDOW_SEC (8 h), oldest first, storing each
window and advancing past it in one transaction, so a restart resumes where it stopped. A gap
whose reads keep failing is tried again less and less often (DUE_GAPS).

The seam: live `pos=S` serves the calls published after second S; group_archives serves calls
by `ts` in [start, end]. A gap (C, S] is read from the archives as ts in [C+1, S], and S is
chosen a few seconds before the service's clock, so every call with ts <= S is published by
the time its window is read. Each call is then read once: from the archive if ts <= S, from the
live endpoint if it was published after S. (A call uploaded late, with a ts well before its
publication, can fall on the wrong side of a seam: see README, "Known limits".)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg.rows import TupleRow

from tasks.ingest.storage import PollRecord, log_failed_poll, store_page
from tasks.ingest.validation import FUTURE_SLACK_SEC, split_page
from workers.clients.broadcastify import BroadcastifyClient, retry_budget
from workers.core.jobs import JobContext, LockLost
from workers.core.records import JSON
from workers.core.rows import one_row
from workers.core.text import error_text

log = logging.getLogger(__name__)

# An archive window is read only once the service's clock is this far past its end.
SETTLE_SEC = 2


def group_ids(groups: JSON) -> list[str]:
    """Group ids from a playlist's stored `groups` (objects with groupId, or plain strings)."""
    found: list[str] = []
    for item in groups if isinstance(groups, list) else []:
        gid = item.get("groupId") if isinstance(item, dict) else item
        if isinstance(gid, str | int) and not isinstance(gid, bool) and str(gid) not in found:
            found.append(str(gid))
    return found


async def plan_backfill(
    conn: psycopg.AsyncConnection[TupleRow], playlist_uuid: str, groups: JSON, first: int, last: int
) -> None:
    gids = group_ids(groups)
    if not gids:
        log.error(
            "playlist %s: calls with ts in [%d, %d] cannot be back-filled: no groups known"
            " (run `bcfy playlists add %s` again)",
            playlist_uuid,
            first,
            last,
            playlist_uuid,
        )
        return
    await conn.execute(
        "INSERT INTO bcfy_backfill (playlist_uuid, group_id, next_ts, until_ts)"
        " SELECT %s, g, %s, %s FROM unnest(%s::text[]) AS g",
        (playlist_uuid, first, last, gids),
    )
    log.warning(
        "playlist %s: calls with ts in [%d, %d] (%ds) are past the live endpoint's reach: "
        "back-filling them from the archives of %d groups",
        playlist_uuid,
        first,
        last,
        last - first + 1,
        len(gids),
    )


@dataclass(frozen=True)
class Gap:
    id: int
    playlist_uuid: str
    group_id: str
    next_ts: int
    until_ts: int


async def read_archive_window(ctx: JobContext, api: BroadcastifyClient, gap: Gap) -> int | None:
    """Read one window of a gap and store it, advancing the gap in the same transaction.
    Returns the calls new, or None when the window is not complete on the service's clock
    yet; raises on failure (after logging the failed request)."""
    end = min(gap.next_ts + int(ctx.settings.ingest.backfill_window_sec) - 1, gap.until_ts)
    if end > math.floor(api.server_now()) - SETTLE_SEC:
        # Calls with ts up to `end` may still be published: reading now could miss some.
        return None
    poll = PollRecord(
        gap.playlist_uuid,
        datetime.now(UTC),
        "backfill",
        group_id=gap.group_id,
        window=(gap.next_ts, end),
    )
    try:
        status, calls = await api.group_archives(gap.group_id, gap.next_ts, end)
        poll = dataclasses.replace(poll, http_status=status)
        records = split_page(
            calls,
            api.server_now() + FUTURE_SLACK_SEC,
            max_record_bytes=ctx.settings.broadcastify.max_record_bytes,
        )
        async with ctx.connection() as conn:
            ctx.ensure_lock()
            stored = await store_page(conn, poll, records, new_cursor=None)
            if end >= gap.until_ts:
                await conn.execute("DELETE FROM bcfy_backfill WHERE id = %s", (gap.id,))
            else:
                await conn.execute(
                    "UPDATE bcfy_backfill SET next_ts = %s, attempts = 0, last_error = NULL,"
                    " updated_at = now() WHERE id = %s",
                    (end + 1, gap.id),
                )
    except LockLost:
        raise
    except Exception as exc:
        await log_failed_poll(ctx, poll, exc)
        try:
            async with ctx.connection() as conn:
                await conn.execute(
                    "UPDATE bcfy_backfill SET attempts = attempts + 1, last_error = %s,"
                    " updated_at = now() WHERE id = %s",
                    (error_text(f"{type(exc).__name__}: {exc}"), gap.id),
                )
        except Exception:
            log.exception("back-fill %s: could not record the failure", gap.id)
        raise
    return stored.new


# The gaps back-fill reads now: of playlists with sync on, and not waiting out a failure (a gap
# whose reads keep failing is tried again less and less often). Polls trigger back-fill only
# while there are some.
DUE_GAPS = """
  FROM bcfy_backfill b JOIN bcfy_playlists p ON p.uuid = b.playlist_uuid
 WHERE p.sync
   AND (b.attempts = 0
        OR b.updated_at <= now() - make_interval(secs => least(3600, 5 * 2 ^ b.attempts)))
"""


async def gaps_due(ctx: JobContext) -> bool:
    """Whether some gap is due to be read now (a poll run then triggers back-fill)."""
    async with ctx.connection() as conn:
        cur = await conn.execute(f"SELECT EXISTS (SELECT 1 {DUE_GAPS})")
        (due,) = one_row(await cur.fetchone())
    return bool(due)


async def read_due_gaps(ctx: JobContext, api: BroadcastifyClient) -> tuple[int, list[str]]:
    """Read the due gaps' windows, oldest first, INGEST_BACKFILL_CONCURRENCY at a time, for at
    most INGEST_BACKFILL_BUDGET_SEC; a window that failed or is not complete yet is not read
    again in this run. Returns the calls new and a line per failed read."""
    s = ctx.settings
    # The budget, and a last round of requests with their retries, end inside the soft limit.
    one_round = retry_budget(s) + s.services.http_total_timeout_sec
    budget = min(s.ingest.backfill_budget_sec, s.jobs.soft_time_limit_sec - one_round)
    deadline = time.monotonic() + max(0.0, budget)
    skipped: list[int] = []  # failed or not complete yet: not again in this run
    errors: list[str] = []
    new = 0
    while True:
        ctx.ensure_lock()
        async with ctx.connection() as conn:
            cur = await conn.execute(
                "SELECT b.id, b.playlist_uuid::text, b.group_id, b.next_ts, b.until_ts"
                f" {DUE_GAPS} AND b.id <> ALL(%s) ORDER BY b.next_ts, b.id LIMIT %s",
                (skipped, s.ingest.backfill_concurrency),
            )
            gaps = [Gap(*row) for row in await cur.fetchall()]
        if not gaps:
            break
        results = await asyncio.gather(
            *(read_archive_window(ctx, api, gap) for gap in gaps), return_exceptions=True
        )
        for gap, result in zip(gaps, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                skipped.append(gap.id)
                errors.append(f"{gap.group_id} from {gap.next_ts}: {result}")
                log.warning("back-fill of group %s failed: %s", gap.group_id, result)
            elif result is None:
                skipped.append(gap.id)  # not complete yet: the next trigger reads it
            else:
                new += result
        if time.monotonic() >= deadline:
            break
    return new, errors
