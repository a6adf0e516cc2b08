"""Storing one page of calls: the calls, the rejected records, the cursor and the poll log row.

`store_page` runs in the caller's transaction: the calls (one INSERT ... ON CONFLICT DO
NOTHING), the quarantined records with their reasons, the cursor (never moved back) and the
request's row in bcfy_playlist_poll_log land together or not at all. `log_failed_poll`
gives a failed request its poll log row too. Live polls and back-fill both store through here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from tasks.ingest.validation import Page
from workers.core.jobs import JobContext
from workers.core.records import JSON, jsonb_problem, storable
from workers.core.rows import one_row
from workers.core.text import error_text

log = logging.getLogger(__name__)


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
    conn: psycopg.AsyncConnection[TupleRow], poll: PollRecord, page: Page, *, new_cursor: int | None
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
    conn: psycopg.AsyncConnection[TupleRow],
    playlist_uuid: str,
    rows: list[dict[str, Any]],
    text: str,
    rejected: list[tuple[str, JSON]],
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
            poll_id, new = one_row(await cur.fetchone(), "the page's INSERT")
            return int(poll_id), int(new)
    except psycopg.DataError as exc:
        log.warning(
            "playlist %s: the page was refused (%s); storing it row by row", playlist_uuid, exc
        )
    cur = await conn.execute(
        "SELECT nextval(pg_get_serial_sequence('bcfy_playlist_poll_log', 'id'))"
    )
    (poll_id,) = one_row(await cur.fetchone(), "nextval")
    new = 0
    for row in rows:
        one, _ = _rows_json([row])
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    _INSERT_CALLS, {"playlist": playlist_uuid, "rows": one, "poll_id": poll_id}
                )
                _, count = one_row(await cur.fetchone(), "a row's INSERT")
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
    conn: psycopg.AsyncConnection[TupleRow],
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
            "error": error_text(error) if error else None,
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
