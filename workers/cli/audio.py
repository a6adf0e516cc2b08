"""`bcfy audio`: the audio stage's state, and giving failed calls another chance.

bcfy audio status                     calls per state, in flight, failures by reason
bcfy audio retry [--code C] [--call ID ...]
                                      failed calls back to pending, attempts reset
                                      (after a fix: an allowed host added, say)
"""

from __future__ import annotations

import argparse

import psycopg

from workers.cli import Subparsers
from workers.core.settings import Settings
from workers.core.text import terminal_safe

STATUS = """
SELECT state, count(*), min(next_attempt_at) FILTER (WHERE state = 'pending'),
       count(*) FILTER (WHERE state = 'downloading' AND lease_until > now())
  FROM call_audio GROUP BY state ORDER BY state
"""
FAILURES = """
SELECT error_code, count(*), max(updated_at) FROM call_audio
 WHERE state = 'failed' GROUP BY error_code ORDER BY count(*) DESC
"""
RETRY = """
UPDATE call_audio
   SET state = 'pending', attempts = 0, next_attempt_at = now(), lease_until = NULL,
       updated_at = now()
 WHERE state = 'failed'
   AND (%(codes)s::text[] IS NULL OR error_code = ANY(%(codes)s))
   AND (%(calls)s::bigint[] IS NULL OR call_id = ANY(%(calls)s))
"""


def add_commands(sub: Subparsers) -> None:
    audio = sub.add_parser("audio", help="the audio stage: status, retry failed calls")
    verbs = audio.add_subparsers(dest="audio_command", required=True, metavar="VERB")
    verbs.add_parser("status", help="calls per state and failures by reason").set_defaults(
        handler=status
    )
    retry_parser = verbs.add_parser("retry", help="failed calls back to pending")
    retry_parser.add_argument("--code", action="append", help="only this error code (repeatable)")
    retry_parser.add_argument("--call", action="append", type=int, help="only this call id")
    retry_parser.set_defaults(handler=retry)


def status(args: argparse.Namespace, settings: Settings) -> int:
    with psycopg.connect(settings.database_url.reveal()) as conn:
        rows = conn.execute(STATUS).fetchall()
        failures = conn.execute(FAILURES).fetchall()
    if not rows:
        print("no calls yet")
        return 0
    for state, count, next_due, live in rows:
        extra = ""
        if state == "pending" and next_due is not None:
            extra = f"  (next due {next_due:%Y-%m-%d %H:%M:%S %Z})"
        elif state == "downloading":
            extra = f"  ({live} with a live lease)"
        print(f"{state:12} {count:8}{extra}")
    for code, count, last in failures:
        shown = terminal_safe(code) or "?"
        print(f"  failed: {shown:20} {count:8}  last {last:%Y-%m-%d %H:%M:%S %Z}")
    return 0


def retry(args: argparse.Namespace, settings: Settings) -> int:
    with psycopg.connect(settings.database_url.reveal()) as conn:
        cur = conn.execute(RETRY, {"codes": args.code, "calls": args.call})
        print(f"{cur.rowcount} failed calls back to pending")
    return 0
