"""Sending what matching wrote to the outbox: claims, sends, retries, the sweep.

A delivery is one outbox row (a rule's match of a call, or a summary of a throttled burst) to
one target. It is sent like this, by any process of the notify pool:
  1. claimed in one committed transaction (`pending` and due -> `sending`, with the claimant's
     process id and a lease of twice ALERT_SEND_TIMEOUT_SEC plus a margin), FOR UPDATE SKIP
     LOCKED, so two workers never claim the same delivery;
  2. sent, holding no database connection, with its idempotency key;
  3. recorded in one transaction: `sent`; or back to `pending`, due after a backoff with jitter
     (at least the target's Retry-After); or `failed` for good (refused, or out of attempts).
A process sends up to ALERT_SEND_CONCURRENCY at once and claims more as each finishes, so a
target that answers slowly or not at all holds up only its own deliveries.

What a receiver can see: a delivery is sent once, unless the worker dies (SIGKILL, power) in
the instant after the target accepted it and before step 3 committed. The sweep then finds the
claim's process gone (at once on the same machine, else when the lease runs out) and sends it
again, with the same idempotency key (the `Idempotency-Key` header of JSON webhooks and of
Apprise's json://, form://, xml://; `idempotency_key` in a webhook's body). A receiver that
drops a key it has seen shows one notification; a chat service shows that message twice.

The sweep (beat, every ALERT_SWEEP_INTERVAL_SEC) takes back claims whose process is gone or
whose lease ran out, sums up throttled bursts, and triggers delivery of anything due (retries,
and deliveries whose trigger message was lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from workers.alerts.targets import SendResult, send, shown_target
from workers.core.backoff import backoff_sec
from workers.core.identity import process_is_gone
from workers.core.runtime import db_connection
from workers.core.settings import CLAIM_MARGIN_SEC, AlertSettings
from workers.core.text import error_text

log = logging.getLogger(__name__)

DELIVER_TASK = "tasks.alerts.deliver_alerts"

# The marks around matched words: Markdown bold (Apprise renders it for each service).
MARK_START, MARK_STOP = "**", "**"
# While sends are in flight, how often a process looks for more due deliveries.
CLAIM_POLL_SEC = 0.2


def trigger_alert_delivery(call_id: int | None = None) -> None:
    """Ask the notify pool to send what is due now. A lost trigger costs only time: the sweep
    triggers whatever is due."""
    from workers.app import app

    try:
        app.send_task(DELIVER_TASK)
    except Exception as exc:
        log.warning("alerts: could not trigger delivery (call %s): %s", call_id, exc)


@dataclass(frozen=True)
class Delivery:
    id: int
    idempotency_key: str
    attempt: int
    target_id: int
    url: str  # a secret: never logged
    shown: str
    rule: str
    title: str
    body: str
    payload: dict[str, Any]


CLAIM_SQL = f"""
WITH claimed AS (
    UPDATE alert_deliveries d
       SET state = 'sending', attempts = d.attempts + 1, due_at = NULL,
           claimed_by = %(worker)s, claimed_until = now() + make_interval(secs => %(lease)s)
     WHERE d.id IN (SELECT id FROM alert_deliveries
                     WHERE state = 'pending' AND due_at <= now()
                     ORDER BY due_at, id
                     LIMIT %(limit)s
                       FOR UPDATE SKIP LOCKED)
 RETURNING d.id, d.idempotency_key, d.attempts, d.outbox_id, d.target_id
)
SELECT cl.id, cl.idempotency_key::text, cl.attempts, tg.id, tg.url, tg.shown, r.name, r.query,
       o.id, o.call_id, o.state, o.created_at,
       c.started_at, coalesce(p.name, c.playlist_uuid::text), c.group_id,
       coalesce(c.display, c.descr, c.grouping), c.url, t.confidence,
       ts_headline('english', t.text, r.tsquery,
                   'HighlightAll=true, StartSel="{MARK_START}", StopSel="{MARK_STOP}"'),
       t.text,
       s.n, s.first_at, s.last_at
  FROM claimed cl
  JOIN alert_targets tg ON tg.id = cl.target_id
  JOIN alert_outbox o ON o.id = cl.outbox_id
  JOIN alert_rules r ON r.id = o.rule_id
  LEFT JOIN bcfy_calls_raw c ON c.id = o.call_id
  LEFT JOIN bcfy_playlists p ON p.uuid = c.playlist_uuid
  LEFT JOIN transcripts t ON t.call_id = o.call_id
  LEFT JOIN LATERAL (
        SELECT count(*) AS n, min(sc.started_at) AS first_at, max(sc.started_at) AS last_at
          FROM alert_outbox so JOIN bcfy_calls_raw sc ON sc.id = so.call_id
         WHERE so.summary_id = o.id) s ON o.state = 'summary'
"""


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _delivery(row: tuple[Any, ...]) -> Delivery:
    (
        delivery_id,
        key,
        attempt,
        target_id,
        url,
        shown,
        rule,
        query,
        outbox_id,
        call_id,
        kind,
        stored_at,
        started_at,
        playlist,
        group_id,
        talkgroup,
        audio_url,
        confidence,
        highlighted,
        text,
        summed,
        first_at,
        last_at,
    ) = row
    if kind == "summary":
        title = f"bcfy alert {rule}: and {summed} more calls"
        body = (
            f"and {summed} more calls matched {query!r} between {_when(first_at)} and "
            f"{_when(last_at)} (over ALERT_MAX_PER_MINUTE, so not sent one by one); "
            f"`bcfy search {query!r}` lists them"
        )
        payload: dict[str, Any] = {
            "rule": rule,
            "query": query,
            "summary": True,
            "more_calls": summed,
            "first_call_at": first_at.isoformat() if first_at else None,
            "last_call_at": last_at.isoformat() if last_at else None,
        }
    else:
        group = f"{group_id} ({talkgroup})" if talkgroup else group_id
        title = f"bcfy alert {rule}: {playlist or '-'} / {group}"
        body = (
            f"{playlist or '-'} / {group}, {_when(started_at)}\n\n{highlighted}\n\n"
            f"audio: {audio_url}"
        )
        payload = {
            "rule": rule,
            "query": query,
            "summary": False,
            "call_id": call_id,
            "time": started_at.isoformat() if started_at else None,
            "playlist": playlist,
            "group_id": group_id,
            "talkgroup": talkgroup,
            "transcript": text,
            "highlighted": highlighted,
            "confidence": confidence,
            "audio_url": audio_url,
        }
    payload["idempotency_key"] = key
    payload["transcript_stored_at"] = stored_at.isoformat()
    payload["outbox_id"] = outbox_id
    return Delivery(delivery_id, key, attempt, target_id, url, shown, rule, title, body, payload)


def claim_lease_sec(alerts: AlertSettings) -> float:
    return alerts.send_timeout_sec * 2 + CLAIM_MARGIN_SEC


async def claim_deliveries(alerts: AlertSettings, worker: str, limit: int) -> list[Delivery]:
    """Up to `limit` due deliveries, claimed by `worker` (committed)."""
    async with db_connection() as conn:
        rows = await (
            await conn.execute(
                CLAIM_SQL,
                {"worker": worker, "lease": claim_lease_sec(alerts), "limit": limit},
            )
        ).fetchall()
    return [_delivery(r) for r in rows]


async def record_outcome(
    delivery: Delivery, worker: str, result: SendResult, alerts: AlertSettings
) -> str:
    """Record one send's outcome; returns the delivery's new state."""
    async with db_connection() as conn:
        if result.ok:
            # Recorded as sent even if the claim was taken over meanwhile: it was sent.
            await conn.execute(
                """UPDATE alert_deliveries
                      SET state = 'sent', sent_at = now(), due_at = NULL, claimed_until = NULL,
                          last_error = NULL
                    WHERE id = %s AND state <> 'sent'""",
                (delivery.id,),
            )
            await conn.execute(
                "UPDATE alert_targets SET consecutive_failures = 0, last_success_at = now()"
                " WHERE id = %s",
                (delivery.target_id,),
            )
            return "sent"
        give_up = not result.transient or delivery.attempt >= alerts.max_attempts
        reason = result.error if result.transient else f"refused: {result.error}"
        if give_up and result.transient:
            reason = f"{result.error} (attempt {delivery.attempt} of {alerts.max_attempts})"
        wait = backoff_sec(
            delivery.attempt,
            alerts.retry_base_sec,
            alerts.retry_max_sec,
            result.retry_after,
        )
        await conn.execute(
            """UPDATE alert_deliveries
                  SET state = %(state)s, last_error = %(error)s, claimed_until = NULL,
                      due_at = CASE WHEN %(state)s = 'pending'
                                    THEN now() + make_interval(secs => %(wait)s) END
                WHERE id = %(id)s AND state = 'sending' AND claimed_by = %(worker)s""",
            {
                "state": "failed" if give_up else "pending",
                "error": error_text(reason),
                "wait": wait,
                "id": delivery.id,
                "worker": worker,
            },
        )
        row = await (
            await conn.execute(
                """UPDATE alert_targets
                      SET consecutive_failures = consecutive_failures + 1,
                          last_error = %s, last_failure_at = now()
                    WHERE id = %s RETURNING consecutive_failures""",
                (error_text(reason), delivery.target_id),
            )
        ).fetchone()
    failures = row[0] if row else 0
    level = logging.WARNING if failures == alerts.target_failing_after else logging.INFO
    log.log(
        level,
        "alert %s to %s: attempt %d failed (%s)%s%s",
        delivery.rule,
        delivery.shown,
        delivery.attempt,
        reason,
        "; failed for good" if give_up else f"; retry in {wait:g}s",
        f"; the target has failed {failures} times in a row" if failures > 1 else "",
    )
    return "failed" if give_up else "pending"


async def send_one(
    http: httpx.AsyncClient, delivery: Delivery, worker: str, alerts: AlertSettings
) -> str:
    result = await send(
        http,
        delivery.url,
        title=delivery.title,
        body=delivery.body,
        payload=delivery.payload,
        idempotency_key=delivery.idempotency_key,
        limit_sec=alerts.send_timeout_sec,
    )
    state = await record_outcome(delivery, worker, result, alerts)
    if state == "sent":
        log.info("alert %s sent to %s", delivery.rule, delivery.shown)
    return state


async def deliver_due(
    alerts: AlertSettings, http: httpx.AsyncClient, worker: str, budget_sec: float
) -> dict[str, int]:
    """Send due deliveries until none is due or the budget is spent (what is in flight then
    finishes). Returns how many ended in each state."""
    deadline = time.monotonic() + budget_sec
    counts: dict[str, int] = {}
    in_flight: set[asyncio.Task[str]] = set()
    try:
        while True:
            room = alerts.send_concurrency - len(in_flight)
            if room > 0 and time.monotonic() < deadline:
                for delivery in await claim_deliveries(alerts, worker, room):
                    in_flight.add(asyncio.create_task(send_one(http, delivery, worker, alerts)))
            if not in_flight:
                return counts
            done, in_flight = await asyncio.wait(
                in_flight, timeout=CLAIM_POLL_SEC, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                state = task.result()
                counts[state] = counts.get(state, 0) + 1
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(in_flight)


# --- the sweep ---------------------------------------------------------------------------


SUMMARIZE_SQL = """
WITH rule AS (
    SELECT r.id FROM alert_rules r
     WHERE r.id = %(rule)s
       AND (r.window_start IS NULL OR r.window_start <= now() - interval '1 minute'
            OR r.window_sent < %(max_per_minute)s)
       FOR UPDATE SKIP LOCKED
), summary AS (
    INSERT INTO alert_outbox (rule_id, call_id, state, summary_count)
    SELECT rule.id, NULL, 'summary',
           (SELECT count(*) FROM alert_outbox
             WHERE rule_id = rule.id AND state = 'throttled')
      FROM rule
    RETURNING id, rule_id
), summed AS (
    UPDATE alert_outbox o SET state = 'summarized', summary_id = summary.id
      FROM summary
     WHERE o.rule_id = summary.rule_id AND o.state = 'throttled'
), window_counted AS (
    UPDATE alert_rules r
       SET window_start = CASE WHEN r.window_start > now() - interval '1 minute'
                               THEN r.window_start ELSE now() END,
           window_sent = CASE WHEN r.window_start > now() - interval '1 minute'
                              THEN r.window_sent + 1 ELSE 1 END
      FROM summary WHERE r.id = summary.rule_id
)
INSERT INTO alert_deliveries (outbox_id, target_id, due_at)
SELECT summary.id, tg.id, now() FROM summary JOIN alert_targets tg ON tg.rule_id = summary.rule_id
RETURNING id
"""


@dataclass(frozen=True)
class SweepOutcome:
    taken_back: int  # claims of dead processes or run-out leases, due again
    summaries: int
    due: int  # deliveries due now


async def sweep_outbox(alerts: AlertSettings) -> SweepOutcome:
    async with db_connection() as conn:
        taken_back = await _take_back_claims(conn)
    summaries = 0
    async with db_connection() as conn:
        rules = await (
            await conn.execute(
                "SELECT DISTINCT rule_id FROM alert_outbox WHERE state = 'throttled'"
            )
        ).fetchall()
    for (rule_id,) in rules:
        async with db_connection() as conn:
            cur = await conn.execute(
                SUMMARIZE_SQL, {"rule": rule_id, "max_per_minute": alerts.max_per_minute}
            )
            summaries += 1 if cur.rowcount else 0
    async with db_connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM alert_deliveries WHERE state = 'pending' AND due_at <= now()"
            )
        ).fetchone()
    return SweepOutcome(taken_back, summaries, row[0] if row else 0)


async def _take_back_claims(conn: psycopg.AsyncConnection[Any]) -> int:
    """Claims whose lease ran out, or whose process is certainly gone (a pool process that died
    on this machine), become due again: sent again with the same idempotency key."""
    rows = await (
        await conn.execute(
            """SELECT id, claimed_by, claimed_until <= now() FROM alert_deliveries
                WHERE state = 'sending' FOR UPDATE SKIP LOCKED"""
        )
    ).fetchall()
    ids = [r[0] for r in rows if r[2] or process_is_gone(r[1])]
    if ids:
        await conn.execute(
            """UPDATE alert_deliveries
                  SET state = 'pending', due_at = now(), claimed_until = NULL,
                      last_error = 'its worker stopped before recording the send'
                WHERE id = ANY(%s)""",
            (ids,),
        )
        log.warning("alerts: %d deliveries claimed by stopped workers are due again", len(ids))
    return len(ids)


__all__ = [
    "DELIVER_TASK",
    "Delivery",
    "SweepOutcome",
    "deliver_due",
    "shown_target",
    "sweep_outbox",
    "trigger_alert_delivery",
]
