"""`bcfy audio`: the audio stage's state, and giving failed calls another chance.

bcfy audio status                     calls per state, in flight, failures by reason
bcfy audio retry [--code C] [--call ID ...]
                                      failed calls back to pending, attempts reset
                                      (after a fix: an allowed host added, say)

A retry reaches past the audio stage: a retried call whose audio becomes ready again is taken up
by the transcription stage as any newly ready call is, which resets a transcription that had
failed for good (RETRY_EFFECT says how; the trigger `call_transcription_on_ready_update` on
call_audio does it, sql/004_transcription.sql). The command counts, before it acts, which
retried calls that will affect and says so.
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
# What a retry does to the transcription stage, once a retried call's audio is ready again:
# the trigger call_transcription_on_ready_update on call_audio (sql/004_transcription.sql)
# inserts or resets the call's call_transcription row as for any call whose audio becomes ready.
# The help and the README say it in these words (tests/audio/test_retry.py checks both).
RETRY_EFFECT = (
    "Once a retried call's audio is ready again, the transcription stage takes it up: a call "
    "with no transcription yet gets one; a call whose transcription had failed for good is "
    "transcribed afresh (pending again, its transcription attempts reset to 0 and its last "
    "error cleared); a call already transcribed keeps its transcript, and one under way goes on."
)

# Failed calls back to pending, and, for what they will do to the transcription stage, each
# one's transcription row as it is now (the retry itself does not touch it).
RETRY = """
WITH retried AS (
    UPDATE call_audio
       SET state = 'pending', attempts = 0, next_attempt_at = now(), lease_until = NULL,
           updated_at = now()
     WHERE state = 'failed'
       AND (%(codes)s::text[] IS NULL OR error_code = ANY(%(codes)s))
       AND (%(calls)s::bigint[] IS NULL OR call_id = ANY(%(calls)s))
    RETURNING call_id
)
SELECT count(*),
       count(*) FILTER (WHERE t.call_id IS NULL),
       count(*) FILTER (WHERE t.state = 'failed'),
       COALESCE(sum(t.attempts) FILTER (WHERE t.state = 'failed'), 0),
       count(*) FILTER (WHERE t.state = 'done'),
       count(*) FILTER (WHERE t.state IN ('pending', 'dispatched', 'running'))
  FROM retried r LEFT JOIN call_transcription t ON t.call_id = r.call_id
"""


def add_commands(sub: Subparsers) -> None:
    audio = sub.add_parser("audio", help="the audio stage: status, retry failed calls")
    verbs = audio.add_subparsers(dest="audio_command", required=True, metavar="VERB")
    verbs.add_parser("status", help="calls per state and failures by reason").set_defaults(
        handler=status
    )
    retry_parser = verbs.add_parser(
        "retry",
        help="failed calls back to pending (transcription: see `bcfy audio retry --help`)",
        description="Failed calls back to pending, their audio attempts reset to 0. "
        + RETRY_EFFECT,
    )
    retry_parser.add_argument("--code", action="append", help="only this error code (repeatable)")
    retry_parser.add_argument("--call", action="append", type=int, help="only this call id")
    retry_parser.set_defaults(handler=retry)


def status(args: argparse.Namespace, settings: Settings) -> int:
    with psycopg.connect(settings.services.database_url.reveal()) as conn:
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
    with psycopg.connect(settings.services.database_url.reveal()) as conn:
        row = conn.execute(RETRY, {"codes": args.code, "calls": args.call}).fetchone()
    assert row is not None
    total, untranscribed, failed, failed_attempts, done, in_progress = row
    print(f"{total} failed calls back to pending")
    if not total:
        return 0
    # The cross-stage effect (RETRY_EFFECT), counted for these calls.
    print("once their audio is ready again, transcription:")
    if untranscribed:
        print(f"  {untranscribed} without a transcription yet: transcribed")
    if failed:
        print(
            f"  {failed} whose transcription failed for good ({failed_attempts} attempts in all):"
            " transcribed afresh, transcription attempts reset to 0"
        )
    if done:
        print(f"  {done} already transcribed: keep their transcript")
    if in_progress:
        print(f"  {in_progress} with a transcription under way: left as it is")
    return 0
