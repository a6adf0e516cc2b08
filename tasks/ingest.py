"""Ingest: poll the followed Broadcastify playlists and store every call exactly once.

Every INGEST_INTERVAL_SEC beat sends `poll_followed_playlists` (a singleton). One run polls the
followed playlists (sync on) concurrently, at most INGEST_POLL_CONCURRENCY at a time; one
playlist's failure never stops the others. Per playlist:

  1. claim it: a playlist whose last request ended less than INGEST_MIN_POLL_GAP_SEC ago, or
     has one in flight, is left alone, even by an overlapping run on another host (the claim
     is one conditional UPDATE of last_polled_at; see _CLAIM);
  2. ask the live endpoint for the calls after its cursor (`init=1` the first time, `pos` ever
     after: never a cursorless re-read), holding no database connection meanwhile. The client
     keeps INGEST_MIN_POLL_GAP_SEC between the end of one request and the next, retries
     included, and renews the claim before each attempt: an attempt is sent only while the
     claim is still this run's;
  3. validate each record: a bad one goes to bcfy_calls_quarantine with its reason, the rest
     are stored by one INSERT ... ON CONFLICT DO NOTHING, and the cursor (forward only, never
     to 0) and the poll log row are written in the same transaction;
  4. once committed, trigger the audio job if anything new was stored.

Back-fill. The live endpoint answers in full only for a recent cursor (INGEST_LIVE_MAX_POS_AGE_SEC;
an older one is clamped silently). When a cursor is too old (after downtime), the poll first
records the gap in bcfy_backfill, one row per group of the playlist, and moves the cursor to a
seam just behind the service's present, in one transaction; live polling goes on from the seam
at once. `backfill_gaps` then reads each gap from group_archives in windows of at most 8 h,
oldest first, storing each window and advancing past it in one transaction. An answer whose
serverTime shows that the service left out part of what was asked (the request took longer
than planned, or our clock is behind) records that part as a gap too.

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
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from workers.app import app
from workers.clients.broadcastify import (
    BroadcastifyClient,
    BroadcastifyError,
    ConfigurationError,
    retry_budget,
)
from workers.core.jobs import JobContext, LockLost, periodic_job
from workers.core.records import (
    DEFAULT_MAX_RECORD_BYTES,
    BadValue,
    bounded_copy,
    json_bytes,
    jsonb_problem,
    real_number,
    show,
    storable,
    whole_number,
)
from workers.core.settings import Settings

log = logging.getLogger(__name__)

AUDIO_JOB = "tasks.audio.process_pending_audio"
BACKFILL_JOB = "tasks.ingest.backfill_gaps"

# --- validation ----------------------------------------------------------------------------------
# Limits that tell a broken record from a real one. A record breaking one is quarantined.
EARLIEST_TS = 946_684_800  # 2000-01-01: no call on the service is older
FUTURE_SLACK_SEC = 86_400  # a ts more than a day past the service's clock is broken
MAX_CALL_SEC = 3_600  # one transmission longer than an hour is a broken record
MAX_GROUP_ID = 100
MAX_URL = 2_048
MAX_TEXT = 1_000  # talkgroup descriptions and labels are short
INT4 = 2**31 - 1
INT8 = 2**63 - 1
# Seconds the seam stays behind our estimate of the service's clock: covers the second being
# published and the clocks' disagreement before the first answer tells us the service's time.
SEAM_LAG_SEC = 10
# An archive window is read only once the service's clock is this far past its end.
SETTLE_SEC = 2

# Typed columns: (record field, row key, kind, lowest, highest).
_INTEGERS = (
    ("sid", "sid", -INT4, INT4),
    ("siteId", "site", -INT4, INT4),
    ("nodeId", "node", -INT8, INT8),
    ("feedId", "feed", -INT4, INT4),
    ("tgId", "tg", -INT4, INT4),
    ("tag", "tag", -INT4, INT4),
    ("src", "src", -INT8, INT8),
    ("size", "size", 0, INT8),
)
_TEXTS = (("descr", "descr"), ("display", "display"), ("grouping", "gr"))


class Rejected(ValueError):
    """A record that cannot be stored as a call; the message is the quarantine reason."""


def validate_call(
    record: Any, latest_ts: float, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> dict[str, Any]:
    """The row to store for one call record, or Rejected with the reason; never any other
    exception, whatever the record holds.

    Types are those the service serves; whole numbers may also come as integral floats or
    ASCII digit strings (tolerated), anything else of the wrong type is rejected. A record
    whose JSON is over max_record_bytes (BCFY_MAX_RECORD_BYTES) is rejected: `raw` keeps
    every field, known or not, so its size is bounded here.
    """
    if not isinstance(record, dict):
        raise Rejected(f"record is not an object but {type(record).__name__}")
    try:
        size = json_bytes(record)
    except BadValue as exc:
        raise Rejected(f"record {exc}") from None
    if size > max_record_bytes:
        raise Rejected(
            f"record is oversize: {size} bytes of JSON, over BCFY_MAX_RECORD_BYTES"
            f" ({max_record_bytes})"
        )
    group_id = record.get("groupId")
    if group_id is None:
        raise Rejected("missing groupId")
    if not isinstance(group_id, str) or not group_id.strip():
        raise Rejected(f"groupId is not a non-empty string: {show(group_id)}")
    if len(group_id) > MAX_GROUP_ID:
        raise Rejected(f"groupId is oversize ({len(group_id)} characters)")
    if record.get("ts") is None:
        raise Rejected("missing ts")
    ts = _whole(record, "ts", EARLIEST_TS, latest_ts)
    url = record.get("url")
    if url is None:
        raise Rejected("missing url")
    if not isinstance(url, str):
        raise Rejected(f"url is not a string: {show(url)}")
    if len(url) > MAX_URL:
        raise Rejected(f"url is oversize ({len(url)} characters)")
    if not url.startswith(("http://", "https://")) or len(url.split("/", 3)[2]) == 0:
        raise Rejected(f"url is not an http(s) URL: {show(url)}")
    if any(c.isspace() for c in url):
        raise Rejected("url contains white space")

    duration = _number(record, "duration", -math.inf, math.inf)
    if duration is not None:
        if duration < 0:
            raise Rejected(f"duration is negative: {_fmt(duration)}")
        if duration > MAX_CALL_SEC:
            raise Rejected(f"duration is absurd: {_fmt(duration)} s (over {MAX_CALL_SEC} s)")
    start = _number(record, "start_ts", EARLIEST_TS, latest_ts)
    end = _number(record, "end_ts", EARLIEST_TS, latest_ts + MAX_CALL_SEC)
    start = float(ts) if start is None else start
    if end is not None:
        if end < start:
            raise Rejected(f"end_ts ({_fmt(end)}) is before the start ({_fmt(start)})")
        if end - start > MAX_CALL_SEC:
            raise Rejected(f"call is absurdly long: {_fmt(end - start)} s from start to end_ts")
        if duration is None:
            duration = end - start
    elif duration is not None:
        end = start + duration

    row: dict[str, Any] = {
        "g": group_id,
        "ts": ts,
        "st": start,
        "en": end,
        "d": duration,
        "url": url,
    }
    for name, key, low, high in _INTEGERS:
        value = record.get(name)
        row[key] = None if value is None else _whole(record, name, low, high)
    freq = _number(record, "freq", 0, 1e6)
    row["freq"] = freq
    for name, key in _TEXTS:
        value = record.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise Rejected(f"{name} is not a string: {show(value)}")
            if len(value) > MAX_TEXT:
                raise Rejected(f"{name} is oversize ({len(value)} characters)")
        row[key] = value
    row["raw"] = record
    return row


def _whole(record: dict[str, Any], name: str, low: float, high: float) -> int:
    try:
        return whole_number(record[name], name, low, high)
    except BadValue as exc:
        raise Rejected(str(exc)) from None


def _number(record: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    try:
        return real_number(value, name, low, high)
    except BadValue as exc:
        raise Rejected(str(exc)) from None


def _fmt(number: float) -> str:
    return show(float(number))


# --- storing a page ------------------------------------------------------------------------------


@dataclass
class Page:
    """What one request returned, split into rows to store and rejected records."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, Any]] = field(default_factory=list)  # (reason, record)

    @property
    def received(self) -> int:
        return len(self.rows) + len(self.rejected)


def split_page(
    records: Sequence[Any], latest_ts: float, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Page:
    """Validate each record of an answer: one bad record never fails the page. A rejected
    record is kept for the quarantine as it came, or cut to about max_record_bytes of JSON
    (marked truncated) when larger."""
    page = Page()
    for record in records:
        try:
            page.rows.append(validate_call(record, latest_ts, max_record_bytes=max_record_bytes))
        except Rejected as exc:
            page.rejected.append((str(exc), bounded_copy(record, max_record_bytes)))
    return page


@dataclass(frozen=True)
class PollRecord:
    """The poll log row's own fields (the counts come from storing)."""

    playlist_uuid: str
    started_at: datetime
    mode: str  # init | pos | backfill
    http_status: int | None = None
    pos_sent: int | None = None
    last_pos: int | None = None
    server_time: int | None = None
    group_id: str | None = None
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class Stored:
    poll_id: int
    received: int
    new: int
    duplicate: int
    quarantined: int


# Each call this stores gets its call_audio row (pending: the audio stage's work queue) in the
# same statement, from the statement-level trigger call_audio_for_new_calls on bcfy_calls_raw
# (sql/003_audio.sql). It stays a trigger because every writer of bcfy_calls_raw relies on it
# (tests and benches store calls directly) and deployments migrate before their workers change.
_INSERT_CALLS = """
WITH poll AS (
    SELECT COALESCE(%(poll_id)s::bigint,
                    nextval(pg_get_serial_sequence('bcfy_playlist_poll_log', 'id'))) AS id
),
stored AS (
    INSERT INTO bcfy_calls_raw (
        playlist_uuid, group_id, call_ts, started_at, ended_at, duration_sec, url,
        sid, site_id, node_id, feed_id, tg_id, tag, freq, src, descr, display, grouping,
        size_bytes, raw, poll_id)
    SELECT %(playlist)s::uuid, r.g, r.ts, to_timestamp(r.st), to_timestamp(r.en), r.d, r.url,
           r.sid, r.site, r.node, r.feed, r.tg, r.tag, r.freq, r.src, r.descr, r.display, r.gr,
           r.size, r.raw, poll.id
      FROM poll, jsonb_to_recordset(%(rows)s::jsonb) AS r(
           g text, ts bigint, st float8, en float8, d float8, url text, sid integer,
           site integer, node bigint, feed integer, tg integer, tag integer, freq float8,
           src bigint, descr text, display text, gr text, size bigint, raw jsonb)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT id FROM poll), (SELECT count(*) FROM stored)
"""

_INSERT_QUARANTINE = """
INSERT INTO bcfy_calls_quarantine (playlist_uuid, poll_id, polled_at, reason, raw)
SELECT %s::uuid, %s, %s, q.reason, COALESCE(q.raw, 'null'::jsonb)  -- a record may be null
  FROM jsonb_to_recordset(%s::jsonb) AS q(reason text, raw jsonb)
"""

_INSERT_POLL_LOG = """
INSERT INTO bcfy_playlist_poll_log (
    id, playlist_uuid, poll_started_at, poll_ended_at, mode, pos_sent, last_pos, server_time,
    group_id, window_start, window_end, success, calls_received, calls_new, calls_duplicate,
    calls_quarantined, http_status, error)
VALUES (COALESCE(%(id)s, nextval(pg_get_serial_sequence('bcfy_playlist_poll_log', 'id'))),
        %(playlist)s, %(started)s, now(), %(mode)s, %(pos_sent)s, %(last_pos)s,
        %(server_time)s, %(group_id)s, %(window_start)s, %(window_end)s, %(success)s,
        %(received)s, %(new)s, %(duplicate)s, %(quarantined)s, %(status)s, %(error)s)
"""


async def store_page(
    conn: psycopg.AsyncConnection[Any], poll: PollRecord, page: Page, *, new_cursor: int | None
) -> Stored:
    """Store a page's calls (one statement), its rejects, the cursor and the poll log row.

    Runs in the caller's transaction: the caller commits, so the calls, the cursor that
    covers them and the log row land together or not at all.
    """
    rows, rejected = page.rows, list(page.rejected)
    text, bad = _rows_json(rows)
    if bad:
        # Values PostgreSQL's json cannot hold (NUL, lone surrogates, NaN): quarantine those.
        rejected += [(reason, rows[i]["raw"]) for i, reason in bad]
        rows = [row for i, row in enumerate(rows) if i not in dict(bad)]
        text, _ = _rows_json(rows)
    poll_id, new = await _insert_calls(conn, poll.playlist_uuid, rows, text, rejected)
    if rejected:
        await conn.execute(
            _INSERT_QUARANTINE,
            (
                poll.playlist_uuid,
                poll_id,
                poll.started_at,
                json.dumps([{"reason": r, "raw": storable(raw)} for r, raw in rejected]),
            ),
        )
        for reason, _ in rejected[:5]:
            log.warning("playlist %s: record quarantined: %s", poll.playlist_uuid, reason)
    if new_cursor is not None:
        # GREATEST: the cursor never moves back, whatever the answer says.
        await conn.execute(
            "UPDATE bcfy_playlists SET cursor_pos = GREATEST(COALESCE(cursor_pos, 0), %s),"
            " updated_at = now() WHERE uuid = %s",
            (new_cursor, poll.playlist_uuid),
        )
    stored = Stored(
        poll_id=poll_id,
        received=page.received,
        new=new,
        duplicate=len(rows) - new,
        quarantined=len(rejected),
    )
    await _log_poll(conn, poll, stored=stored)
    return stored


async def _insert_calls(
    conn: psycopg.AsyncConnection[Any],
    playlist_uuid: str,
    rows: list[dict[str, Any]],
    text: str,
    rejected: list[tuple[str, Any]],
) -> tuple[int, int]:
    """(poll id, calls new) for one INSERT of the whole page.

    Should PostgreSQL still refuse a value that validation let through, the page is stored row
    by row instead (each in a savepoint) and the rows it refuses are quarantined with its
    message: one bad record must never hold back the page, or the cursor, for good.
    """
    try:
        async with conn.transaction():  # a savepoint: the fallback below can go on after it
            cur = await conn.execute(
                _INSERT_CALLS, {"playlist": playlist_uuid, "rows": text, "poll_id": None}
            )
            poll_id, new = await cur.fetchone()  # type: ignore[misc]
            return int(poll_id), int(new)
    except psycopg.DataError as exc:
        log.warning(
            "playlist %s: the page was refused (%s); storing it row by row", playlist_uuid, exc
        )
    cur = await conn.execute(
        "SELECT nextval(pg_get_serial_sequence('bcfy_playlist_poll_log', 'id'))"
    )
    (poll_id,) = await cur.fetchone()  # type: ignore[misc]
    new = 0
    for row in rows:
        one, _ = _rows_json([row])
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    _INSERT_CALLS, {"playlist": playlist_uuid, "rows": one, "poll_id": poll_id}
                )
                _, count = await cur.fetchone()  # type: ignore[misc]
                new += int(count)
        except psycopg.DataError as exc:
            rejected.append((f"refused by the database: {exc}", row["raw"]))
    return int(poll_id), new


def _rows_json(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[int, str]]]:
    """The rows as one JSON text, and the rows whose values JSON in PostgreSQL cannot hold."""
    text: str | None
    try:
        text = json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        text = None
    if text is not None and "\\u0000" not in text:
        return text, []
    bad = [(i, reason) for i, row in enumerate(rows) if (reason := jsonb_problem(row["raw"]))]
    if not bad and text is not None:
        return text, []  # only a literal backslash-u0000 in some text: harmless
    if not bad:
        # Validation lets no such row through; should one pass, it is quarantined, not lost.
        bad = [(i, "cannot be written as JSON") for i in range(len(rows))]
    return text or "[]", bad


async def _log_poll(
    conn: psycopg.AsyncConnection[Any],
    poll: PollRecord,
    *,
    stored: Stored | None = None,
    error: str | None = None,
) -> None:
    await conn.execute(
        _INSERT_POLL_LOG,
        {
            "id": stored.poll_id if stored else None,
            "playlist": poll.playlist_uuid,
            "started": poll.started_at,
            "mode": poll.mode,
            "pos_sent": poll.pos_sent,
            "last_pos": poll.last_pos,
            "server_time": poll.server_time,
            "group_id": poll.group_id,
            "window_start": poll.window[0] if poll.window else None,
            "window_end": poll.window[1] if poll.window else None,
            "success": error is None,
            "received": stored.received if stored else 0,
            "new": stored.new if stored else 0,
            "duplicate": stored.duplicate if stored else 0,
            "quarantined": stored.quarantined if stored else 0,
            "status": poll.http_status,
            "error": error[:2000] if error else None,
        },
    )


async def log_failed_poll(ctx: JobContext, poll: PollRecord, error: BaseException) -> None:
    """A failed request still gets its poll log row (in a transaction of its own)."""
    status = getattr(error, "status", None)
    poll = dataclasses.replace(poll, http_status=status or poll.http_status)
    try:
        async with ctx.connection() as conn:
            await _log_poll(conn, poll, error=f"{type(error).__name__}: {error}")
    except Exception as exc:
        log.error("playlist %s: could not log the failed poll: %s", poll.playlist_uuid, exc)


# --- polling -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollOutcome:
    playlist_uuid: str
    new: int = 0
    error: BaseException | None = None


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
    return s.http_total_timeout_sec + s.ingest_min_poll_gap_sec


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
                    "gap": s.ingest_min_poll_gap_sec,
                    "hold": _claim_hold(s),
                },
            )
        ).fetchone()
    if claimed is None:
        log.info(
            "playlist %s: polled under %gs ago (or being polled); not again yet",
            playlist_uuid,
            s.ingest_min_poll_gap_sec,
        )
        return PollOutcome(playlist_uuid)
    cursor, groups, stamp = claimed
    claim = _Claim(ctx, playlist_uuid, stamp)
    try:
        return await _poll_claimed(ctx, api, claim, cursor, groups)
    finally:
        await claim.end()


async def _poll_claimed(
    ctx: JobContext, api: BroadcastifyClient, claim: _Claim, cursor: int | None, groups: Any
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
            page.calls, latest, max_record_bytes=ctx.settings.bcfy_max_record_bytes
        )
        new_cursor = _next_cursor(playlist_uuid, cursor, page.last_pos, page.server_time, records)
        gap = _missed_by_retention(ctx, cursor, page.server_time)
        unknown = {row["g"] for row in records.rows} - set(_group_ids(groups))
        async with ctx.connection() as conn:
            ctx.ensure_lock()
            stored = await store_page(conn, poll, records, new_cursor=new_cursor)
            if unknown:
                # The playlist gained groups since it was added: back-fill must cover them too.
                groups = await _add_groups(conn, playlist_uuid, sorted(unknown))
            if gap:
                await _plan_backfill(conn, playlist_uuid, groups, *gap)
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


# --- back-fill -----------------------------------------------------------------------------------


def _group_ids(groups: Any) -> list[str]:
    """Group ids from a playlist's stored `groups` (objects with groupId, or plain strings)."""
    found: list[str] = []
    for item in groups if isinstance(groups, list) else []:
        gid = item.get("groupId") if isinstance(item, dict) else item
        if isinstance(gid, str | int) and not isinstance(gid, bool) and str(gid) not in found:
            found.append(str(gid))
    return found


async def _add_groups(
    conn: psycopg.AsyncConnection[Any], playlist_uuid: str, group_ids: list[str]
) -> Any:
    log.info("playlist %s: calls from new groups %s", playlist_uuid, ", ".join(group_ids))
    cur = await conn.execute(
        "UPDATE bcfy_playlists SET groups = groups || %s::jsonb, updated_at = now()"
        " WHERE uuid = %s RETURNING groups",
        (json.dumps([{"groupId": g} for g in group_ids]), playlist_uuid),
    )
    row = await cur.fetchone()
    return row[0] if row else []


def _retention_margin(ctx: JobContext) -> float:
    """How much younger than the retention limit a cursor must be to be sent as it is: time for
    the request and its retries, so the service still answers for it when the answer is made."""
    s = ctx.settings
    return min(
        s.ingest_live_max_pos_age_sec / 2,
        s.bcfy_retry_budget_sec + s.http_total_timeout_sec + 5,
    )


async def _leap_past_retention(
    ctx: JobContext, api: BroadcastifyClient, playlist_uuid: str, cursor: int, groups: Any
) -> int:
    """When the cursor is older than the live endpoint answers for, record the gap for
    back-fill and move the cursor to the seam, in one transaction. Returns the cursor to send."""
    s = ctx.settings
    now = api.server_now()
    if cursor >= now - s.ingest_live_max_pos_age_sec + _retention_margin(ctx):
        return cursor
    seam = math.floor(now) - SEAM_LAG_SEC
    if seam <= cursor:
        return cursor
    if not _group_ids(groups):
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
        await _plan_backfill(conn, playlist_uuid, groups, cursor + 1, seam)
    return seam


def _missed_by_retention(
    ctx: JobContext, pos_sent: int | None, server_time: int | None
) -> tuple[int, int] | None:
    """The ts range an answer silently left out because `pos` was past the retention limit
    (the request took longer than planned): calls published at or before
    floor(serverTime - max age) are not in it."""
    if pos_sent is None or server_time is None:
        return None
    limit = math.floor(server_time - ctx.settings.ingest_live_max_pos_age_sec)
    if pos_sent >= limit:
        return None
    return pos_sent + 1, limit


async def _plan_backfill(
    conn: psycopg.AsyncConnection[Any], playlist_uuid: str, groups: Any, first: int, last: int
) -> None:
    gids = _group_ids(groups)
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
    end = min(gap.next_ts + int(ctx.settings.ingest_backfill_window_sec) - 1, gap.until_ts)
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
            max_record_bytes=ctx.settings.bcfy_max_record_bytes,
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
                    (f"{type(exc).__name__}: {exc}"[:2000], gap.id),
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


@periodic_job(BACKFILL_JOB, rerun_on_trigger=True)
async def backfill_gaps(ctx: JobContext) -> None:
    """Recover recorded gaps from group_archives, oldest windows first, for at most
    INGEST_BACKFILL_BUDGET_SEC; what is left waits for the next trigger (each poll run sends
    one while gaps remain)."""
    s = ctx.settings
    api = ctx.runtime.bcfy_api
    # The budget, and a last round of requests with their retries, end inside the soft limit.
    one_round = retry_budget(s) + s.http_total_timeout_sec
    budget = min(s.ingest_backfill_budget_sec, s.job_soft_time_limit_sec - one_round)
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
                (skipped, s.ingest_backfill_concurrency),
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
    if new:
        await _trigger(AUDIO_JOB)
    if errors:
        raise BackfillIncomplete(f"{len(errors)} archive reads failed: " + "; ".join(errors[:5]))


class BackfillIncomplete(Exception):
    """Some windows could not be read; they stay recorded and are tried again."""


# --- the job -------------------------------------------------------------------------------------


class PollsFailed(Exception):
    """Some playlists could not be polled (the others were)."""


@periodic_job("tasks.ingest.poll_followed_playlists")
async def poll_followed_playlists(ctx: JobContext) -> None:
    """Poll each followed playlist once and store its new calls."""
    s = ctx.settings
    api = ctx.runtime.bcfy_api
    async with ctx.connection() as conn:
        cur = await conn.execute(
            "SELECT uuid::text FROM bcfy_playlists WHERE sync ORDER BY last_polled_at NULLS FIRST"
        )
        playlists = [uuid for (uuid,) in await cur.fetchall()]
    bound = asyncio.Semaphore(s.ingest_poll_concurrency)

    async def poll_one(uuid: str) -> PollOutcome:
        async with bound:
            return await poll_playlist(ctx, api, uuid)

    outcomes = await asyncio.gather(*(poll_one(uuid) for uuid in playlists))
    ctx.ensure_lock()  # a poll that found the lock lost stopped: so does the run
    if any(o.new for o in outcomes):
        await _trigger(AUDIO_JOB)
    async with ctx.connection() as conn:
        cur = await conn.execute(f"SELECT EXISTS (SELECT 1 {DUE_GAPS})")
        (gaps,) = await cur.fetchone()  # type: ignore[misc]
    if gaps:
        await _trigger(BACKFILL_JOB)
    failures = [o for o in outcomes if o.error is not None]
    if failures:
        config = next((o.error for o in failures if isinstance(o.error, ConfigurationError)), None)
        summary = "; ".join(f"{o.playlist_uuid}: {o.error}" for o in failures[:5])
        message = f"{len(failures)} of {len(playlists)} playlists failed: {summary}"
        if config is not None:
            raise ConfigurationError(message)
        raise PollsFailed(message)


async def _trigger(task_name: str) -> None:
    """Send a job its trigger by name (a Redis publish: off the event loop)."""
    try:
        await asyncio.to_thread(app.send_task, task_name)
    except Exception as exc:
        log.error("could not trigger %s: %s", task_name, exc)
