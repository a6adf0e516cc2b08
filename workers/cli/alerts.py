"""`bcfy alerts`: keyword rules that notify people as calls are transcribed.

    bcfy alerts add NAME --query '"structure fire" or "working fire"' [--playlist NAME|UUID]
                    [--group GROUP_ID] [--min-confidence X] --notify URL [--notify URL ...]
    bcfy alerts list | show NAME | disable NAME | enable NAME | remove NAME
    bcfy alerts test NAME         send a sample message to every target of the rule

The query is read exactly as `bcfy search` reads it (web-search syntax, English stemming); a
query that reads as nothing to look for is refused. A target is an Apprise URL (discord://,
tgram://, slack://, mailto://, ntfy://, pover://, matrix://, json://, ...) or an http(s) JSON
webhook. Target URLs carry tokens: they are never printed whole, only their scheme (and the
host of a web hook).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from workers.alerts.stats import rule_stats
from workers.alerts.targets import quiet_target_logs, send, shown_target, target_problem
from workers.cli import Subparsers
from workers.core.fulltext import QueryError, check_query
from workers.core.settings import Settings
from workers.core.text import terminal_safe


class Refused(Exception):
    """A request the command refuses (exit 2), with the reason."""


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(
        settings.services.database_url.reveal(),
        connect_timeout=int(settings.services.db_connect_timeout_sec),
        autocommit=True,
    )


def _confidence(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {raw!r}")
    return value


def _playlist_uuid(conn: psycopg.Connection[Any], playlist: str) -> uuid.UUID:
    row = conn.execute(
        "SELECT uuid FROM bcfy_playlists WHERE uuid::text = lower(%s) OR lower(name) = lower(%s)"
        " ORDER BY uuid LIMIT 2",
        (playlist, playlist),
    ).fetchall()
    if len(row) != 1:
        why = "no followed playlist" if not row else "more than one playlist"
        raise Refused(f"--playlist {playlist!r}: {why} has that name or uuid (bcfy playlists list)")
    return uuid.UUID(str(row[0][0]))


def _add(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
    try:
        parsed = check_query(conn, args.query)
    except QueryError as exc:
        raise Refused(str(exc)) from None
    for url in args.notify:
        problem = target_problem(url)
        if problem:
            raise Refused(f"--notify {problem}")
    playlist = _playlist_uuid(conn, args.playlist) if args.playlist else None
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO alert_rules (name, query, playlist_uuid, group_id, min_confidence)
               VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id""",
            (args.name, args.query, playlist, args.group, args.min_confidence),
        ).fetchone()
        if row is None:
            raise Refused(f"a rule named {args.name!r} exists (bcfy alerts remove it first)")
        for url in dict.fromkeys(args.notify):
            conn.execute(
                "INSERT INTO alert_targets (rule_id, url, shown) VALUES (%s, %s, %s)",
                (row[0], url, shown_target(url)),
            )
    targets = ", ".join(shown_target(u) for u in dict.fromkeys(args.notify))
    print(f"rule {terminal_safe(args.name)} added; its query reads as: {terminal_safe(parsed)}")
    print(f"notifies: {targets}")
    return 0


def _rule_id(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT id FROM alert_rules WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise Refused(f"no rule named {name!r} (bcfy alerts list)")
    return int(row[0])


def _fmt_delay(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def _list(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
    stats = {s.rule: s for s in rule_stats(conn, settings.alerts.target_failing_after)}
    rows = conn.execute(
        """SELECT r.name, r.query, r.playlist_uuid, r.group_id, r.min_confidence,
                  (SELECT count(*) FROM alert_targets t WHERE t.rule_id = r.id)
             FROM alert_rules r ORDER BY r.name"""
    ).fetchall()
    if not rows:
        print("no alert rules (bcfy alerts add NAME --query ... --notify URL)")
        return 0
    for name, query, playlist, group, confidence, targets in rows:
        st = stats[name]
        filters = [
            f"playlist {playlist}" if playlist else "",
            f"group {group}" if group else "",
            f"confidence >= {confidence:g}" if confidence is not None else "",
        ]
        shown = "; ".join(f for f in filters if f)
        print(
            f"{terminal_safe(name)}  {'on' if st.enabled else 'off'}  {terminal_safe(query)!r}"
            f"{'  ' + shown if shown else ''}  targets {targets}"
            f"  sent {st.sent}  failed {st.failed}  throttled {st.throttled}"
            f"  delay p95 {_fmt_delay(st.delay_p95_sec)}"
            + (f"  ! {len(st.failing_targets)} failing" if st.failing_targets else "")
        )
    return 0


def _show(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
    rule_id = _rule_id(conn, args.name)
    row = conn.execute(
        """SELECT name, query, tsquery::text, playlist_uuid, group_id, min_confidence, enabled,
                  created_at FROM alert_rules WHERE id = %s""",
        (rule_id,),
    ).fetchone()
    assert row is not None
    name, query, parsed, playlist, group, confidence, enabled, created = row
    st = next(s for s in rule_stats(conn, settings.alerts.target_failing_after) if s.rule == name)
    print(f"rule {terminal_safe(name)} ({'enabled' if enabled else 'disabled'})")
    print(f"  query       {terminal_safe(query)!r}  (reads as {terminal_safe(parsed)})")
    print(f"  playlist    {playlist or 'any'}")
    print(f"  group       {terminal_safe(group) or 'any'}")
    print(f"  confidence  {'any' if confidence is None else f'at least {confidence:g}'}")
    print(f"  created     {created.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    print(
        f"  sent {st.sent}, failed {st.failed}, waiting {st.waiting}, throttled {st.throttled};"
        f" delay from transcript (1 h) p50 {_fmt_delay(st.delay_p50_sec)}"
        f" p95 {_fmt_delay(st.delay_p95_sec)}"
    )
    print("  targets:")
    for shown, failures, error in conn.execute(
        """SELECT shown, consecutive_failures, last_error FROM alert_targets
            WHERE rule_id = %s ORDER BY id""",
        (rule_id,),
    ).fetchall():
        state = "ok"
        if failures >= settings.alerts.target_failing_after:
            state = f"FAILING ({failures} in a row: {terminal_safe(error)})"
        elif failures:
            state = f"{failures} failure(s) in a row: {terminal_safe(error)}"
        print(f"    {shown}  {state}")
    return 0


def _set_enabled(enabled: bool) -> Any:
    def handler(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
        rule_id = _rule_id(conn, args.name)
        conn.execute("UPDATE alert_rules SET enabled = %s WHERE id = %s", (enabled, rule_id))
        print(f"rule {terminal_safe(args.name)} {'enabled' if enabled else 'disabled'}")
        return 0

    return handler


def _remove(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
    rule_id = _rule_id(conn, args.name)
    conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
    print(f"rule {terminal_safe(args.name)} removed, with its targets and history")
    return 0


def _test(args: argparse.Namespace, settings: Settings, conn: psycopg.Connection[Any]) -> int:
    rule_id = _rule_id(conn, args.name)
    query, targets = conn.execute(
        """SELECT r.query, array_agg(t.url ORDER BY t.id) FROM alert_rules r
             JOIN alert_targets t ON t.rule_id = r.id WHERE r.id = %s GROUP BY r.query""",
        (rule_id,),
    ).fetchone() or (None, [])
    quiet_target_logs()
    now = datetime.now(UTC)
    title = f"bcfy alert {args.name}: test"
    body = f"A test of the rule {args.name!r} ({query}), sent by `bcfy alerts test`."
    payload = {"rule": args.name, "query": query, "test": True, "time": now.isoformat()}

    async def send_all() -> list[tuple[str, str]]:
        async with httpx.AsyncClient() as http:
            results = await asyncio.gather(
                *(
                    send(
                        http,
                        url,
                        title=title,
                        body=body,
                        payload={**payload, "idempotency_key": key},
                        idempotency_key=key,
                        limit_sec=settings.alerts.send_timeout_sec,
                    )
                    for url, key in ((u, str(uuid.uuid4())) for u in targets)
                )
            )
        return [
            (shown_target(url), "sent" if r.ok else f"FAILED: {r.error}")
            for url, r in zip(targets, results, strict=True)
        ]

    outcomes = asyncio.run(send_all())
    for shown, outcome in outcomes:
        print(f"{shown}  {outcome}")
    return 0 if all(o == "sent" for _, o in outcomes) else 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with _connect(settings) as conn:
            code: int = args.action(args, settings, conn)
            return code
    except Refused as exc:
        print(f"bcfy alerts {args.alerts_command}: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"bcfy alerts: cannot reach the database: {exc}", file=sys.stderr)
        return 1


def add_commands(sub: Subparsers) -> None:
    alerts = sub.add_parser(
        "alerts",
        help="keyword alerts: rules that notify as calls are transcribed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    alerts.set_defaults(handler=_run)
    actions = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a rule")
    add.add_argument("name")
    add.add_argument("--query", required=True, help="what to listen for, as for bcfy search")
    add.add_argument("--playlist", help="only calls of this playlist (name or uuid)")
    add.add_argument("--group", help="only calls of this talkgroup (its groupId)")
    add.add_argument(
        "--min-confidence", type=_confidence, help="only transcripts at least this confident"
    )
    add.add_argument(
        "--notify",
        action="append",
        required=True,
        metavar="URL",
        help="an Apprise URL or an http(s) JSON webhook; repeat for several",
    )
    add.set_defaults(action=_add)
    actions.add_parser("list", help="every rule, with what it sent").set_defaults(action=_list)
    for name, action, text in (
        ("show", _show, "a rule, its targets and what it sent"),
        ("disable", _set_enabled(False), "stop matching a rule (kept)"),
        ("enable", _set_enabled(True), "match a disabled rule again"),
        ("remove", _remove, "delete a rule, its targets and history"),
        ("test", _test, "send a sample message to every target of a rule"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("name")
        parser.set_defaults(action=action)
