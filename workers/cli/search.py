"""`bcfy search`: what was said, over PostgreSQL full-text search.

    bcfy search "structure fire" [--playlist NAME|UUID] [--group GROUP_ID] [--since 6h|DATE]
                [--limit 20] [--json]

The query is web-search syntax (workers.core.fulltext, shared with alert rules): words are
ANDed and stemmed ("fires" finds "fire"), "quoted phrases" match in order, `or` and `-word`
work; a query that reads as nothing to look for is refused. Newest call first; each
hit shows the call's time, playlist, talkgroup, a snippet with the matches highlighted
(ts_headline, computed for the shown rows only), when in the call the matching words were said
(where the recogniser gave word times) and where its audio is: a path with the filesystem
store, a time-limited link (AUDIO_S3_LINK_TTL_SEC) with the S3 store. --json adds every segment
and word with its times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from workers.audio.store import StoreError, store_for, uses_object_store
from workers.cli import Subparsers
from workers.core.fulltext import TSQUERY_SQL, QueryError, check_query
from workers.core.records import whole_number_or_none
from workers.core.settings import Settings
from workers.core.text import terminal_safe

# The snippet's highlight marks, replaced for the terminal or kept for --json. The text's own
# \x02 and \x03, if any, become U+FFFD before ts_headline, so that only the marks are marks.
_START, _STOP = "\x02", "\x03"
_MARKS = re.compile(f"([{_START}{_STOP}])")

SEARCH_SQL = f"""
WITH q0 AS (SELECT {TSQUERY_SQL} AS query),
q AS (
    -- The query's lexemes, to find the words that match (querytree leaves negated ones out).
    SELECT query, ARRAY(
               SELECT replace(m[1], '''''', '''')
                 FROM regexp_matches(querytree(query), '''((?:[^'']|'''')+)''', 'g') AS m
           ) AS lexemes
      FROM q0
),
hits AS (
    SELECT t.call_id, t.text, t.confidence, t.segments, c.started_at, c.playlist_uuid,
           c.group_id,
           coalesce(c.display, c.descr, c.grouping) AS talkgroup,
           coalesce(a.original_path, a.prepared_path) AS audio_path
      FROM transcripts t
      JOIN bcfy_calls_raw c ON c.id = t.call_id
      LEFT JOIN call_audio a ON a.call_id = t.call_id
     CROSS JOIN q
     WHERE t.search @@ q.query
       AND (%(playlist)s::text IS NULL OR c.playlist_uuid IN (
                SELECT p.uuid FROM bcfy_playlists p
                 WHERE p.uuid::text = lower(%(playlist)s) OR lower(p.name) = lower(%(playlist)s)))
       AND (%(group)s::text IS NULL OR c.group_id = %(group)s)
       AND (%(since)s::timestamptz IS NULL OR c.started_at >= %(since)s)
     ORDER BY c.started_at DESC, c.id DESC
     LIMIT %(limit)s
)
SELECT h.call_id, h.started_at, p.name, h.playlist_uuid, h.group_id, h.talkgroup,
       ts_headline('english', translate(h.text, E'\\x02\\x03', E'\\uFFFD\\uFFFD'), q.query,
                   'StartSel={_START}, StopSel={_STOP}, MaxWords=35, MinWords=15'),
       h.audio_path, h.confidence, h.segments,
       (SELECT coalesce(jsonb_agg(w.word ORDER BY s.n, w.n), '[]')
          FROM jsonb_array_elements(h.segments) WITH ORDINALITY AS s (segment, n)
         CROSS JOIN LATERAL jsonb_array_elements(
                   CASE WHEN jsonb_typeof(s.segment -> 'words') = 'array'
                        THEN s.segment -> 'words' ELSE '[]' END
               ) WITH ORDINALITY AS w (word, n)
         WHERE tsvector_to_array(to_tsvector('english', w.word ->> 'text')) && q.lexemes)
  FROM hits h
 CROSS JOIN q
  LEFT JOIN bcfy_playlists p ON p.uuid = h.playlist_uuid
 ORDER BY h.started_at DESC, h.call_id DESC
"""


@dataclass(frozen=True)
class Hit:
    call_id: int
    started_at: datetime
    playlist: str | None
    playlist_uuid: str | None
    group_id: str
    talkgroup: str | None
    snippet: str  # matches between _START and _STOP
    audio_key: str | None  # in the audio store; None when the call has no stored audio
    confidence: float | None
    # As stored: [{"start", "end", "text", "confidence", "words": [{"start", "end", "text",
    # "confidence"}, ...]}, ...], seconds from the start of the call; "words" is empty or
    # missing where the backend gave no word times (README, "Word timings").
    segments: list[dict[str, Any]]
    # The words that match the query, in order, with their times: where to listen.
    matches: list[dict[str, Any]]
    # Where to get the audio: an absolute path (filesystem store) or a presigned URL valid
    # until audio_url_expires_at (S3 store); both None when it has no stored audio.
    audio_path: str | None = None
    audio_url: str | None = None
    audio_url_expires_at: str | None = None


def search_transcripts(
    conn: psycopg.Connection[TupleRow],
    query: str,
    *,
    playlist: str | None = None,
    group: str | None = None,
    since: datetime | None = None,
    limit: int = 20,
) -> list[Hit]:
    rows = conn.execute(
        SEARCH_SQL,
        {"query": query, "playlist": playlist, "group": group, "since": since, "limit": limit},
    ).fetchall()
    return [
        Hit(
            call_id=r[0],
            started_at=r[1],
            playlist=r[2],
            playlist_uuid=str(r[3]) if r[3] else None,
            group_id=r[4],
            talkgroup=r[5],
            snippet=r[6],
            audio_key=r[7],
            confidence=r[8],
            segments=r[9],
            matches=r[10],
        )
        for r in rows
    ]


async def with_audio_links(hits: list[Hit], settings: Settings) -> list[Hit]:
    """Each hit with where its audio can be had: a path, or a time-limited link."""
    store = store_for(settings)
    s3 = uses_object_store(settings.audio)
    expires = (datetime.now(UTC) + timedelta(seconds=settings.audio.s3_link_ttl_sec)).isoformat()
    out = []
    for h in hits:
        if h.audio_key is None:
            out.append(h)
            continue
        link = await store.link(h.audio_key)
        if s3:
            out.append(replace(h, audio_url=link, audio_url_expires_at=expires))
        else:
            out.append(replace(h, audio_path=link))
    return out


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(raw: str, now: datetime | None = None) -> datetime:
    """`90m`, `6h`, `2d`, `1w` before now, or an ISO date/time (UTC unless it says otherwise)."""
    match = _RELATIVE.match(raw)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {raw!r}: expected an age like 30m, 6h, 2d, 1w or a date like 2024-05-01"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _positive(raw: str) -> int:
    value = whole_number_or_none(raw, "value", 1)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {raw!r}")
    return value


def _search(args: argparse.Namespace, settings: Settings) -> int:
    if not args.query.strip():
        print("bcfy search: give some words to look for", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(
            settings.services.database_url.reveal(),
            connect_timeout=int(settings.services.db_connect_timeout_sec),
            autocommit=True,
        ) as conn:
            try:
                check_query(conn, args.query)
            except QueryError as exc:
                print(f"bcfy search: {exc}", file=sys.stderr)
                return 2
            hits = search_transcripts(
                conn,
                args.query,
                playlist=args.playlist,
                group=args.group,
                since=args.since,
                limit=args.limit,
            )
    except psycopg.OperationalError as exc:
        print(f"bcfy search: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    try:
        hits = asyncio.run(with_audio_links(hits, settings))
    except StoreError as exc:
        print(f"bcfy search: cannot make links to the audio: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out = []
        for h in hits:
            item = asdict(h)
            item["started_at"] = h.started_at.isoformat()
            item["snippet"] = h.snippet.replace(_START, "").replace(_STOP, "")
            item["highlighted"] = h.snippet.replace(_START, "<b>").replace(_STOP, "</b>")
            out.append(item)
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if not hits:
        print("no matching calls")
        return 0
    start, stop = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
    for h in hits:
        when = h.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        playlist = terminal_safe(h.playlist or h.playlist_uuid or "-")
        group_id, talkgroup = terminal_safe(h.group_id), terminal_safe(h.talkgroup)
        group = f"{group_id} ({talkgroup})" if talkgroup else group_id
        print(f"{when}  {playlist}  {group}")
        print(f"    {_highlighted(h.snippet, start, stop)}")
        if h.matches:
            at = ", ".join(_clock(m.get("start")) for m in h.matches[:5])
            print(f"    said at {at}{' ...' if len(h.matches) > 5 else ''}")
        if h.audio_url:
            print(f"    {terminal_safe(h.audio_url)}  (link valid until {h.audio_url_expires_at})")
        else:
            print(f"    {terminal_safe(h.audio_path) or '(no audio stored)'}")
    print(f"{len(hits)} call{'s' if len(hits) != 1 else ''}, newest first")
    return 0


def _clock(seconds: Any) -> str:
    """Seconds from the start of the call as m:ss.s."""
    value = float(seconds) if isinstance(seconds, int | float) else 0.0
    minutes, rest = divmod(value, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def _highlighted(snippet: str, start: str, stop: str) -> str:
    """The snippet for the terminal: the marks become `start`/`stop`, the text between them is
    made safe to print (text from outside: the transcription backend's)."""
    marks = {_START: start, _STOP: stop}
    return "".join(marks.get(part) or terminal_safe(part) for part in _MARKS.split(snippet))


def add_commands(sub: Subparsers) -> None:
    search = sub.add_parser(
        "search",
        help="search what was said (full-text, newest first)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("query", help='words to look for, e.g. "structure fire"')
    search.add_argument("--playlist", help="only calls from this playlist (name or uuid)")
    search.add_argument("--group", help="only calls of this talkgroup (its groupId)")
    search.add_argument(
        "--since", type=parse_since, help="only calls since: 30m, 6h, 2d, 1w or a date"
    )
    search.add_argument(
        "--limit", type=_positive, default=20, help="at most this many (default 20)"
    )
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(handler=_search)
