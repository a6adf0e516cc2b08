"""The live poll: each followed playlist's claim, its request, its cursor.

Every INGEST_INTERVAL_SEC the poll job (`tasks.ingest.jobs`) polls the followed playlists
(sync on) concurrently, at most INGEST_POLL_CONCURRENCY at a time; one playlist's failure
never stops the others. Per playlist:

  1. claim it: a playlist whose last request ended less than INGEST_MIN_POLL_GAP_SEC ago, or
     has one in flight, is left alone, even by an overlapping run on another host (the claim
     is one conditional UPDATE of last_polled_at; see _CLAIM);
  2. ask the live endpoint for the calls after its cursor (`init=1` the first time, `pos` ever
     after: never a cursorless re-read), holding no database connection meanwhile. The client
     keeps INGEST_MIN_POLL_GAP_SEC between the end of one request and the next, retries
     included, and renews the claim before each attempt: an attempt is sent only while the
     claim is still this run's;
  3. validate each record (`tasks.ingest.validation`): a bad one is quarantined with its
     reason; store the rest, the cursor (forward only, never to 0: _next_cursor) and the poll
     log row in one transaction (`tasks.ingest.storage`);
  4. the job then triggers the audio job if anything new was stored.

The retention leap: the live endpoint answers in full only for a recent cursor
(INGEST_LIVE_MAX_POS_AGE_SEC; an older one is clamped silently). When a cursor is too old
(after downtime), the poll first records the gap for back-fill (`tasks.ingest.backfill`) and
moves the cursor to a seam just behind the service's present, in one transaction; live polling
goes on from the seam at once. An answer whose serverTime shows that the service left out part
of what was asked (the request took longer than planned, or our clock is behind) records that
part as a gap too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg.rows import TupleRow

from tasks.ingest.backfill import group_ids, plan_backfill
from tasks.ingest.storage import PollRecord, log_failed_poll, store_page
from tasks.ingest.validation import FUTURE_SLACK_SEC, Page, split_page
from workers.clients.broadcastify import BroadcastifyClient, BroadcastifyError
from workers.core.jobs import JobContext, LockLost
from workers.core.records import JSON
from workers.core.settings import Settings

log = logging.getLogger(__name__)

# Seconds the seam stays behind our estimate of the service's clock: covers the second being
# published and the clocks' disagreement before the first answer tells us the service's time.
SEAM_LAG_SEC = 10


@dataclass(frozen=True)
class PollOutcome:
    playlist_uuid: str
    new: int = 0
    error: BaseException | None = None


async def poll_followed(ctx: JobContext, api: BroadcastifyClient) -> list[PollOutcome]:
    """Poll each followed playlist once, INGEST_POLL_CONCURRENCY at a time, least recently
    polled first; one playlist's failure never stops the others."""
    async with ctx.connection() as conn:
        cur = await conn.execute(
            "SELECT uuid::text FROM bcfy_playlists WHERE sync ORDER BY last_polled_at NULLS FIRST"
        )
        playlists = [uuid for (uuid,) in await cur.fetchall()]
    bound = asyncio.Semaphore(ctx.settings.ingest.poll_concurrency)

    async def poll_one(uuid: str) -> PollOutcome:
        async with bound:
            return await poll_playlist(ctx, api, uuid)

    return list(await asyncio.gather(*(poll_one(uuid) for uuid in playlists)))


# last_polled_at is the database's record of the 5 s rule, on the one clock every host shares:
# while a request may be in flight it holds the latest that request can end (now() + hold:
# HTTP_TOTAL_TIMEOUT_SEC and a margin), and once the request has ended, its end. A claim needs
# it INGEST_MIN_POLL_GAP_SEC in the past, so no host polls within the gap of another's request
# (and a crashed poller's hold simply runs out). The stamp a claim sets is its token: renewing
# before each attempt, and stamping the end, happen only while it is still there.
_CLAIM = """
UPDATE bcfy_playlists SET last_polled_at = now() + make_interval(secs => %(hold)s)
 WHERE uuid = %(uuid)s AND sync
   AND (last_polled_at IS NULL OR last_polled_at <= now() - make_interval(secs => %(gap)s))
RETURNING cursor_pos, groups, last_polled_at
"""

_RENEW = """
UPDATE bcfy_playlists SET last_polled_at = now() + make_interval(secs => %(hold)s)
 WHERE uuid = %(uuid)s AND last_polled_at = %(stamp)s
RETURNING last_polled_at
"""

_ENDED = """
UPDATE bcfy_playlists SET last_polled_at = now()
 WHERE uuid = %(uuid)s AND last_polled_at = %(stamp)s
"""


def _claim_hold(s: Settings) -> float:
    """Seconds a claim holds a playlist for a request: the request (HTTP_TOTAL_TIMEOUT_SEC at
    most) and the steps before it is sent (a wait of up to the gap, a login)."""
    return s.services.http_total_timeout_sec + s.ingest.min_poll_gap_sec


class ClaimLost(Exception):
    """Another run claimed the playlist since this one did: its next attempt is not sent."""


class _Claim:
    """This run's claim on one playlist: renewed before each attempt, ended after the request."""

    def __init__(self, ctx: JobContext, playlist_uuid: str, stamp: datetime) -> None:
        self.ctx = ctx
        self.playlist_uuid = playlist_uuid
        self.stamp = stamp
        self.hold = _claim_hold(ctx.settings)

    async def renew(self) -> None:
        """Before each attempt: hold the playlist for it, or refuse it (ClaimLost, LockLost)."""
        self.ctx.ensure_lock()
        async with self.ctx.connection() as conn:
            row = await (
                await conn.execute(
                    _RENEW, {"uuid": self.playlist_uuid, "stamp": self.stamp, "hold": self.hold}
                )
            ).fetchone()
        if row is None:
            raise ClaimLost(
                f"playlist {self.playlist_uuid}: polled by another run since this one claimed "
                "it; not asked again"
            )
        (self.stamp,) = row

    async def end(self) -> None:
        """After the poll, whatever its outcome: the gap counts from now (a little after the
        answer: on the safe side)."""
        try:
            async with self.ctx.connection() as conn:
                await conn.execute(_ENDED, {"uuid": self.playlist_uuid, "stamp": self.stamp})
        except Exception as exc:
            # The hold runs out by itself; the next poll is only later.
            log.warning("playlist %s: could not record the poll's end: %s", self.playlist_uuid, exc)


async def poll_playlist(
    ctx: JobContext, api: BroadcastifyClient, playlist_uuid: str
) -> PollOutcome:
    """One live poll of one playlist: claim, request, store. Never raises."""
    s = ctx.settings
    async with ctx.connection() as conn:
        claimed = await (
            await conn.execute(
                _CLAIM,
                {
                    "uuid": playlist_uuid,
                    "gap": s.ingest.min_poll_gap_sec,
                    "hold": _claim_hold(s),
                },
            )
        ).fetchone()
    if claimed is None:
        log.info(
            "playlist %s: polled under %gs ago (or being polled); not again yet",
            playlist_uuid,
            s.ingest.min_poll_gap_sec,
        )
        return PollOutcome(playlist_uuid)
    cursor, groups, stamp = claimed
    claim = _Claim(ctx, playlist_uuid, stamp)
    try:
        return await _poll_claimed(ctx, api, claim, cursor, groups)
    finally:
        await claim.end()


async def _poll_claimed(
    ctx: JobContext, api: BroadcastifyClient, claim: _Claim, cursor: int | None, groups: JSON
) -> PollOutcome:
    playlist_uuid = claim.playlist_uuid
    poll = PollRecord(
        playlist_uuid, datetime.now(UTC), "init" if cursor is None else "pos", pos_sent=cursor
    )
    try:
        if cursor is not None:
            cursor = await _leap_past_retention(ctx, api, playlist_uuid, cursor, groups)
            poll = dataclasses.replace(poll, pos_sent=cursor)
        page = await api.live_calls(
            playlist_uuid, pos=cursor, init=cursor is None, before_send=claim.renew
        )
        poll = dataclasses.replace(
            poll, http_status=page.status, last_pos=page.last_pos, server_time=page.server_time
        )
        latest = (page.server_time or api.server_now()) + FUTURE_SLACK_SEC
        records = split_page(
            page.calls, latest, max_record_bytes=ctx.settings.broadcastify.max_record_bytes
        )
        new_cursor = _next_cursor(playlist_uuid, cursor, page.last_pos, page.server_time, records)
        gap = _missed_by_retention(ctx, cursor, page.server_time)
        unknown = {row["g"] for row in records.rows} - set(group_ids(groups))
        async with ctx.connection() as conn:
            ctx.ensure_lock()
            stored = await store_page(conn, poll, records, new_cursor=new_cursor)
            if unknown:
                # The playlist gained groups since it was added: back-fill must cover them too.
                groups = await _add_groups(conn, playlist_uuid, sorted(unknown))
            if gap:
                await plan_backfill(conn, playlist_uuid, groups, *gap)
    except LockLost as exc:
        return PollOutcome(playlist_uuid, error=exc)  # the job stops; no writes
    except ClaimLost as exc:
        # An overlapping run polls it now: this run's failed attempt is logged, not its error.
        log.info("%s", exc)
        await log_failed_poll(ctx, poll, exc)
        return PollOutcome(playlist_uuid)
    except Exception as exc:
        if not isinstance(exc, BroadcastifyError):
            log.exception("playlist %s: poll failed", playlist_uuid)
        else:
            log.warning("playlist %s: poll failed: %s", playlist_uuid, exc)
        await log_failed_poll(ctx, poll, exc)
        return PollOutcome(playlist_uuid, error=exc)
    if stored.new or stored.quarantined or stored.duplicate:
        log.info(
            "playlist %s: %d received, %d new, %d duplicate, %d quarantined; cursor %s",
            playlist_uuid,
            stored.received,
            stored.new,
            stored.duplicate,
            stored.quarantined,
            new_cursor or cursor,
        )
    return PollOutcome(playlist_uuid, new=stored.new)


def _next_cursor(
    playlist_uuid: str,
    cursor: int | None,
    last_pos: int | None,
    server_time: int | None,
    page: Page,
) -> int | None:
    """The cursor after this answer, or None to keep the current one.

    lastPos 0 (the service's answer when nothing is new) or missing keeps the cursor; so does a
    lastPos ahead of the service's own clock (it would skip calls). store_page never moves it
    back.
    """
    if not last_pos or last_pos <= 0:
        if page.received:
            log.warning(
                "playlist %s: %d calls but no lastPos: cursor kept (the next poll may re-read)",
                playlist_uuid,
                page.received,
            )
        return None
    if server_time is not None and last_pos > server_time:
        log.warning(
            "playlist %s: lastPos %d is ahead of serverTime %d: cursor kept",
            playlist_uuid,
            last_pos,
            server_time,
        )
        return None
    if cursor is not None and last_pos < cursor:
        return None
    return last_pos


async def _add_groups(
    conn: psycopg.AsyncConnection[TupleRow], playlist_uuid: str, new_groups: list[str]
) -> JSON:
    log.info("playlist %s: calls from new groups %s", playlist_uuid, ", ".join(new_groups))
    cur = await conn.execute(
        "UPDATE bcfy_playlists SET groups = groups || %s::jsonb, updated_at = now()"
        " WHERE uuid = %s RETURNING groups",
        (json.dumps([{"groupId": g} for g in new_groups]), playlist_uuid),
    )
    row = await cur.fetchone()
    return row[0] if row else []


# --- the retention leap: a cursor too old for the live endpoint -----------------------------------


def _retention_margin(ctx: JobContext) -> float:
    """How much younger than the retention limit a cursor must be to be sent as it is: time for
    the request and its retries, so the service still answers for it when the answer is made."""
    s = ctx.settings
    return min(
        s.ingest.live_max_pos_age_sec / 2,
        s.broadcastify.retry_budget_sec + s.services.http_total_timeout_sec + 5,
    )


async def _leap_past_retention(
    ctx: JobContext, api: BroadcastifyClient, playlist_uuid: str, cursor: int, groups: JSON
) -> int:
    """When the cursor is older than the live endpoint answers for, record the gap for
    back-fill and move the cursor to the seam, in one transaction. Returns the cursor to send."""
    s = ctx.settings
    now = api.server_now()
    if cursor >= now - s.ingest.live_max_pos_age_sec + _retention_margin(ctx):
        return cursor
    seam = math.floor(now) - SEAM_LAG_SEC
    if seam <= cursor:
        return cursor
    if not group_ids(groups):
        log.warning(
            "playlist %s: cursor is %ds old but no groups are known, so the gap cannot be "
            "back-filled: run `bcfy playlists add %s` again",
            playlist_uuid,
            now - cursor,
            playlist_uuid,
        )
        return cursor
    async with ctx.connection() as conn:
        ctx.ensure_lock()
        moved = await conn.execute(
            "UPDATE bcfy_playlists SET cursor_pos = %s, updated_at = now()"
            " WHERE uuid = %s AND cursor_pos = %s",
            (seam, playlist_uuid, cursor),
        )
        if moved.rowcount != 1:
            raise RuntimeError(f"playlist {playlist_uuid}: cursor changed under this poll")
        await plan_backfill(conn, playlist_uuid, groups, cursor + 1, seam)
    return seam


def _missed_by_retention(
    ctx: JobContext, pos_sent: int | None, server_time: int | None
) -> tuple[int, int] | None:
    """The ts range an answer silently left out because `pos` was past the retention limit
    (the request took longer than planned): calls published at or before
    floor(serverTime - max age) are not in it."""
    if pos_sent is None or server_time is None:
        return None
    limit = math.floor(server_time - ctx.settings.ingest.live_max_pos_age_sec)
    if pos_sent >= limit:
        return None
    return pos_sent + 1, limit
