"""`bcfy playlists`: which playlists the ingest job follows.

bcfy playlists add UUID           fetch its name, groups and counties from the service and
                                  follow it (again: refresh them; its cursor is kept)
bcfy playlists list               followed playlists, their cursor, last poll and calls
bcfy playlists remove UUID        stop following it (the calls stored stay)
bcfy playlists sync UUID on|off   pause or resume polling it
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid as uuid_mod
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypedDict, TypeVar

from psycopg.rows import TupleRow

from workers.cli import Subparsers
from workers.clients.broadcastify import BroadcastifyError
from workers.core.records import JSON, BadValue, JSONObject, as_text, storable, whole_number
from workers.core.runtime import Runtime, db_connection
from workers.core.settings import Settings
from workers.core.text import terminal_safe

T = TypeVar("T")


def add_commands(sub: Subparsers) -> None:
    playlists = sub.add_parser("playlists", help="the playlists the ingest job follows")
    what = playlists.add_subparsers(dest="playlists_command", required=True, metavar="ACTION")
    add = what.add_parser("add", help="follow a playlist (fetches its name and groups)")
    add.add_argument("uuid", type=_uuid)
    add.set_defaults(handler=add_playlist)
    what.add_parser("list", help="list followed playlists").set_defaults(handler=list_playlists)
    remove = what.add_parser("remove", help="stop following a playlist (its calls stay)")
    remove.add_argument("uuid", type=_uuid)
    remove.set_defaults(handler=remove_playlist)
    sync = what.add_parser("sync", help="pause (off) or resume (on) polling a playlist")
    sync.add_argument("uuid", type=_uuid)
    sync.add_argument("state", choices=["on", "off"])
    sync.add_argument(
        "--from-now",
        action="store_true",
        help="on: start again from the latest calls instead of back-filling the paused time",
    )
    sync.set_defaults(handler=set_sync)


def _uuid(text: str) -> str:
    try:
        return str(uuid_mod.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a playlist uuid: {text!r}") from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on this process's runtime (its HTTP client and database pool), then close it."""
    try:
        return Runtime.current().run(coro)
    finally:
        Runtime.shutdown_current()


# --- add -----------------------------------------------------------------------------------


def add_playlist(args: argparse.Namespace, settings: Settings) -> int:
    try:
        row = _run(_add(args.uuid))
    except BroadcastifyError as exc:
        print(f"bcfy playlists add: the service said: {terminal_safe(str(exc))}", file=sys.stderr)
        return 1
    name, groups, ctids, created = row
    verb = "following" if created else "refreshed"
    print(
        f"{verb} {args.uuid}: {terminal_safe(name) or '(no name)'} - {groups} groups"
        + (f", counties {', '.join(map(str, ctids))}" if ctids else "")
    )
    if created:
        print(f"the ingest job polls it every {settings.jobs.ingest_interval_sec:g} s")
    return 0


async def _add(playlist_uuid: str) -> tuple[str | None, int, list[int], bool]:
    info = await Runtime.current().bcfy_api.playlist_get(playlist_uuid)
    row = playlist_row(info)
    async with db_connection() as conn:
        cur = await conn.execute(
            """
            INSERT INTO bcfy_playlists (uuid, name, descr, groups, ctids, public, raw)
            VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s::jsonb)
            ON CONFLICT (uuid) DO UPDATE SET
                name = EXCLUDED.name, descr = EXCLUDED.descr, groups = EXCLUDED.groups,
                ctids = EXCLUDED.ctids, public = EXCLUDED.public, raw = EXCLUDED.raw,
                updated_at = now()
            RETURNING name, jsonb_array_length(groups), ctids, xmax = 0
            """,
            (
                playlist_uuid,
                row["name"],
                row["descr"],
                json.dumps(row["groups"]),
                row["ctids"],
                row["public"],
                json.dumps(row["raw"]),
            ),
        )
        inserted = await cur.fetchone()
    if inserted is None:  # INSERT ... ON CONFLICT DO UPDATE ... RETURNING always returns it
        raise RuntimeError("bcfy playlists add: the insert returned no row")
    name, n_groups, stored_ctids, created = inserted
    return name, n_groups, list(stored_ctids), created


class PlaylistRow(TypedDict):
    """A bcfy_playlists row's columns, as `bcfy playlists add` stores them."""

    name: str | None
    descr: str | None
    groups: JSON
    ctids: list[int]
    public: bool | None
    raw: JSON


def playlist_row(info: JSONObject) -> PlaylistRow:
    """The columns of a playlist from the service's answer (any JSON object): never raises.
    Values PostgreSQL cannot hold (NUL, NaN) are replaced; county ids that are not whole
    numbers are left out."""
    inner = info.get("playlist")
    if isinstance(inner, dict):
        info = inner
    groups = info.get("groups")
    listed = info.get("ctids")
    ctids: list[int] = []
    for ctid in listed if isinstance(listed, list) else []:
        try:
            ctids.append(whole_number(ctid, "ctid", 0, 2**31 - 1))
        except BadValue:
            continue
    public = info.get("public")
    return {
        "name": as_text(info.get("name")),
        "descr": as_text(info.get("descr")),
        "groups": storable(groups if isinstance(groups, list) else []),
        "ctids": ctids,
        "public": public if isinstance(public, bool) else None if public is None else bool(public),
        "raw": storable(info),
    }


# --- list ------------------------------------------------------------------------------------


def list_playlists(args: argparse.Namespace, settings: Settings) -> int:
    rows = _run(_list())
    if not rows:
        print("no playlists followed: bcfy playlists add UUID")
        return 0
    header = ("uuid", "name", "sync", "groups", "cursor", "last poll", "calls", "back-fill")
    table = [header]
    for uuid, name, sync, groups, cursor, polled, success, error, calls, gaps in rows:
        last = "never" if polled is None else _ago(polled)
        if success is False:
            last += f" FAILED: {terminal_safe(error)[:60]}"
        table.append(
            (
                uuid,
                terminal_safe(name)[:30],
                "on" if sync else "off",
                str(groups),
                "-" if cursor is None else datetime.fromtimestamp(cursor, UTC).strftime("%F %T"),
                last,
                str(calls),
                f"{gaps} gaps" if gaps else "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    return 0


async def _list() -> list[TupleRow]:
    async with db_connection() as conn:
        cur = await conn.execute(
            """
            SELECT p.uuid::text, p.name, p.sync, jsonb_array_length(p.groups), p.cursor_pos,
                   last.poll_started_at, last.success, last.error,
                   (SELECT count(*) FROM bcfy_calls_raw c WHERE c.playlist_uuid = p.uuid),
                   (SELECT count(*) FROM bcfy_backfill b WHERE b.playlist_uuid = p.uuid)
              FROM bcfy_playlists p
              LEFT JOIN LATERAL (
                   SELECT poll_started_at, success, error FROM bcfy_playlist_poll_log l
                    WHERE l.playlist_uuid = p.uuid AND l.mode <> 'backfill'
                    ORDER BY poll_started_at DESC LIMIT 1) last ON true
             ORDER BY p.created_at
            """
        )
        return list(await cur.fetchall())


def _ago(when: datetime) -> str:
    seconds = int((datetime.now(UTC) - when).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


# --- remove, sync --------------------------------------------------------------------------------


def remove_playlist(args: argparse.Namespace, settings: Settings) -> int:
    row = _run(_one("DELETE FROM bcfy_playlists WHERE uuid = %s RETURNING name", args.uuid))
    if row is None:
        print(f"bcfy playlists remove: {args.uuid} is not followed", file=sys.stderr)
        return 1
    print(
        f"no longer following {args.uuid} ({terminal_safe(row[0]) or 'no name'});"
        " its stored calls stay"
    )
    return 0


def set_sync(args: argparse.Namespace, settings: Settings) -> int:
    on = args.state == "on"
    if args.from_now and not on:
        print("bcfy playlists sync: --from-now goes with on", file=sys.stderr)
        return 2
    row = _run(_set_sync(args.uuid, on, args.from_now))
    if row is None:
        print(f"bcfy playlists sync: {args.uuid} is not followed (add it first)", file=sys.stderr)
        return 1
    name, cursor = row
    print(f"{args.uuid} ({terminal_safe(name) or 'no name'}): polling {'on' if on else 'paused'}")
    if on and cursor is not None:
        since = datetime.fromtimestamp(cursor, UTC).strftime("%F %T UTC")
        print(
            f"it goes on from {since}; calls since then older than the live endpoint keeps are"
            " read from the archives (billed). --from-now starts from the latest calls instead."
        )
    return 0


async def _set_sync(playlist_uuid: str, on: bool, from_now: bool) -> TupleRow | None:
    """(name, cursor) of the playlist, or None when it is not followed."""
    async with db_connection() as conn:
        if from_now:
            # init=1 on the next poll: the latest calls, no back-fill of the paused time.
            await conn.execute(
                "DELETE FROM bcfy_backfill WHERE playlist_uuid = %s", (playlist_uuid,)
            )
        cur = await conn.execute(
            "UPDATE bcfy_playlists SET sync = %s, updated_at = now(),"
            " cursor_pos = CASE WHEN %s THEN NULL ELSE cursor_pos END"
            " WHERE uuid = %s RETURNING name, cursor_pos",
            (on, from_now, playlist_uuid),
        )
        return await cur.fetchone()


async def _one(query: str, *params: str) -> TupleRow | None:
    async with db_connection() as conn:
        return await (await conn.execute(query, params)).fetchone()
