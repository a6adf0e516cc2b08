"""Claims: a `call_transcription` row while a worker transcribes its call.

A delivery of `transcribe_call` claims the call in one transaction: only a call that is not
done, not failed and not claimed by a live worker. A claim lasts the task's hard time limit,
after which Celery has killed the holder for certain; a claim that ran out makes the call due
for the dispatcher again. A duplicate delivery finds the call done or claimed and does nothing.
A claim ends in one of three ways, each one transaction: the transcript stored and the call
`done` (transcripts.call_id is unique: whatever happens, a call never gets two transcripts);
`failed` with the reason; or released for a retry.

What happens to a message when a worker dies mid-task: with late acks the message is still
unacknowledged. If only the pool process died (the OOM killer, a crash in native code), the
worker rejects it back to the queue (task_reject_on_worker_lost) and it is delivered again at
once; the claim names the machine and process that made it (workers.core.identity), so the
redelivery sees that process is gone (workers.core.identity.process_is_gone) and takes the call
over. If the whole worker died, Redis hands the message out again after
BROKER_VISIBILITY_TIMEOUT_SEC; a redelivery that cannot tell the claimant is dead (another
machine, a process that is still there) is dropped, and the dispatcher sends the call again when
the dead worker's claim runs out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from tasks.transcription.policy import gave_up, out_of_attempts
from workers.alerts.matching import match_transcript
from workers.core.identity import process_is_gone
from workers.core.runtime import db_connection
from workers.core.settings import Settings
from workers.core.text import error_text
from workers.recognizers import Recognition

log = logging.getLogger(__name__)

# Past the hard time limit, a few seconds for Celery to have killed the process.
CLAIM_MARGIN_SEC = 10.0


@dataclass(frozen=True)
class TranscriptionClaim:
    """A call this process now holds for transcription: its attempt number and audio file."""

    attempt: int
    prepared_path: str  # the prepared audio's key in the store
    prepared_sha256: str | None  # checked when it is read


class Skip(str):
    """Why a delivery does nothing (a duplicate, a call already finished)."""


async def claim_call(
    call_id: int, worker: str, settings: Settings, reclaim: str | None = None
) -> TranscriptionClaim | Skip:
    """Take the call for this worker, or say why not. One transaction."""
    async with db_connection() as conn:
        row = await (
            await conn.execute(
                """SELECT t.state, t.due_at <= now(), t.due_at, t.attempts, t.claimed_by,
                          t.last_error, a.state, a.prepared_path,
                          a.prepared_sha256
                     FROM call_transcription t
                     LEFT JOIN call_audio a ON a.call_id = t.call_id
                    WHERE t.call_id = %s
                      FOR UPDATE OF t""",
                (call_id,),
            )
        ).fetchone()
        if row is None:
            return Skip("no such call waiting for transcription (its audio was never ready)")
        (state, due, due_at, attempts, claimed_by, last_error, audio_state, prepared, sha256) = row
        if state == "done":
            return Skip("already transcribed: duplicate delivery dropped")
        if state == "failed":
            return Skip(f"failed for good before: {last_error}")
        if state == "running" and not due and claimed_by != reclaim:
            if not process_is_gone(claimed_by):
                return Skip(
                    f"claimed by {claimed_by} until {due_at:%H:%M:%S}: duplicate delivery"
                    " dropped (sent again by the dispatcher if that claim runs out)"
                )
            log.warning(
                "call %s: its claimant %s is gone; taking the call over", call_id, claimed_by
            )
        if audio_state != "ready" or not prepared:
            await conn.execute(
                "UPDATE call_transcription SET state = 'pending', due_at = now(),"
                " updated_at = now() WHERE call_id = %s",
                (call_id,),
            )
            return Skip(f"its audio is not ready (state {audio_state}): back to pending")
        if out_of_attempts(attempts, settings):
            reason = gave_up(attempts, last_error)
            await _set_failed(conn, call_id, reason)
            return Skip(reason)
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'running', attempts = attempts + 1, claimed_by = %s,
                      claimed_at = now(), due_at = now() + make_interval(secs => %s),
                      updated_at = now()
                WHERE call_id = %s""",
            (worker, settings.transcription.time_limit_sec + CLAIM_MARGIN_SEC, call_id),
        )
        return TranscriptionClaim(attempts + 1, prepared, sha256)


@dataclass(frozen=True)
class Stored:
    inserted: bool  # False: the call had its transcript already (kept)
    alerts_due: int  # alert deliveries its matches made due (workers.alerts.matching)


async def store_transcript(
    call_id: int,
    backend: str,
    result: Recognition,
    processing_sec: float,
    alert_max_per_minute: int,
) -> Stored:
    """The transcript, its alert matches (outbox rows) and `done`, in one transaction."""
    async with db_connection() as conn:
        cur = await conn.execute(
            """INSERT INTO transcripts (call_id, text, segments, language, backend, model,
                                        confidence, audio_duration_sec, processing_sec,
                                        empty_reason, dropped_segments)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (call_id) DO NOTHING
               RETURNING id""",
            (
                call_id,
                result.text,
                Jsonb([s.as_json() for s in result.segments]),
                result.language,
                backend,
                result.model,
                result.confidence,
                result.audio_duration_sec,
                round(processing_sec, 3),
                result.empty_reason and result.empty_reason.value,
                Jsonb([d.as_json() for d in result.dropped]),
            ),
        )
        row = await cur.fetchone()
        # Only the transaction that inserted the transcript matches it: a second worker
        # finishing the same call stores nothing and notifies nobody.
        alerts_due = (
            await match_transcript(conn, row[0], alert_max_per_minute) if row is not None else 0
        )
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'done', due_at = NULL, finished_at = now(), last_error = NULL,
                      updated_at = now()
                WHERE call_id = %s""",
            (call_id,),
        )
    return Stored(row is not None, alerts_due)


async def _set_failed(conn: psycopg.AsyncConnection[TupleRow], call_id: int, reason: str) -> None:
    await conn.execute(
        """UPDATE call_transcription
              SET state = 'failed', due_at = NULL, finished_at = now(), last_error = %s,
                  updated_at = now()
            WHERE call_id = %s""",
        (error_text(reason), call_id),
    )


async def record_failure(call_id: int, reason: str) -> None:
    async with db_connection() as conn:
        await _set_failed(conn, call_id, reason)


async def release_for_retry(
    call_id: int, worker: str, reason: str, countdown: float, settings: Settings
) -> None:
    """Give the claim back: the retry message takes it. Should that message be lost, the call is
    due for the dispatcher once the countdown and a dispatch lease have passed."""
    async with db_connection() as conn:
        await conn.execute(
            """UPDATE call_transcription
                  SET state = 'dispatched', last_error = %s, updated_at = now(),
                      due_at = now() + make_interval(secs => %s)
                WHERE call_id = %s AND state = 'running' AND claimed_by = %s""",
            (
                error_text(reason),
                countdown + settings.transcription.dispatch_lease_sec,
                call_id,
                worker,
            ),
        )
