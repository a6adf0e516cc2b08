"""Matching a stored transcript against the alert rules, in the transaction that stores it.

Every enabled rule whose query matches the transcript (the rule's tsquery, parsed once the way
`bcfy search` parses, against the transcript's `search` column) and whose playlist, talkgroup
and minimum confidence fit the call gets one outbox row for the call: unique per rule and call,
so however often and by however many workers a call is finished, one notification. Each rule's
minute window (ALERT_MAX_PER_MINUTE) is counted here: a match past the limit is written as
`throttled`, without deliveries, and beat's sweep sums those up in one message.

Every enabled rule's stored tsquery is evaluated against the transcript (a scan of the rules:
with 1,000 of them cheaper than looking them up by the transcript's lexemes in a GIN index,
which was tried; bench/alerts.py).

Two statements: the first finds the matching rules and locks them in id order (concurrent
transcripts matching the same rules take turns, never deadlock); most transcripts match no rule
and stop there. The second counts the windows, writes the outbox rows and their deliveries.
"""

from __future__ import annotations

from typing import Any

import psycopg

MATCHING_RULES_SQL = """
SELECT r.id, t.call_id
  FROM transcripts t
  JOIN bcfy_calls_raw c ON c.id = t.call_id
  JOIN alert_rules r ON r.enabled AND t.search @@ r.tsquery
 WHERE t.id = %(transcript)s
   AND (r.playlist_uuid IS NULL OR r.playlist_uuid = c.playlist_uuid)
   AND (r.group_id IS NULL OR r.group_id = c.group_id)
   AND (r.min_confidence IS NULL OR t.confidence >= r.min_confidence)
 ORDER BY r.id
   FOR UPDATE OF r
"""

WRITE_OUTBOX_SQL = """
WITH windows AS (
    UPDATE alert_rules r
       SET window_start = CASE WHEN r.window_start > now() - interval '1 minute'
                               THEN r.window_start ELSE now() END,
           window_sent = CASE WHEN r.window_start > now() - interval '1 minute'
                              THEN r.window_sent + 1 ELSE 1 END
     WHERE r.id = ANY(%(rules)s)
 RETURNING r.id, r.window_sent <= %(max_per_minute)s AS notify
), outbox AS (
    INSERT INTO alert_outbox (rule_id, call_id, state)
    SELECT w.id, %(call)s, CASE WHEN w.notify THEN 'notify' ELSE 'throttled' END FROM windows w
    ON CONFLICT (rule_id, call_id) WHERE call_id IS NOT NULL DO NOTHING
    RETURNING id, rule_id, state
)
INSERT INTO alert_deliveries (outbox_id, target_id, due_at)
SELECT o.id, tg.id, now()
  FROM outbox o JOIN alert_targets tg ON tg.rule_id = o.rule_id
 WHERE o.state = 'notify'
RETURNING id
"""


async def match_transcript(
    conn: psycopg.AsyncConnection[Any], transcript_id: int, max_per_minute: int
) -> int:
    """Write the outbox rows of a transcript just stored on `conn` (its transaction); returns
    how many deliveries are now due."""
    rows = await (await conn.execute(MATCHING_RULES_SQL, {"transcript": transcript_id})).fetchall()
    if not rows:
        return 0
    cur = await conn.execute(
        WRITE_OUTBOX_SQL,
        {"rules": [r[0] for r in rows], "call": rows[0][1], "max_per_minute": max_per_minute},
    )
    return len(await cur.fetchall())
