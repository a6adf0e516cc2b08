"""Pruning rows: what goes after which RETENTION_* setting, oldest first, RETENTION_BATCH_SIZE
rows per transaction. A prune that deletes or forgets files lists them in audio_file_trash in
the same transaction (tasks.maintenance.trash removes them after the commit). Rows are only
pruned once their counters are folded (tasks.maintenance.fold): every cutoff is at most the
oldest counter checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from tasks.maintenance.run import Run, db_now
from tasks.maintenance.trash import empty_trash
from workers.core.counters import COUNTERS
from workers.core.runtime import db_connection

log = logging.getLogger(__name__)

DAY = 86400.0
# A pruning transaction never waits long for a lock some worker holds; it tries again next run.
LOCK_TIMEOUT = "2s"


# --- the deletes: one batch each, in its own transaction ---------------------------------------
# %(cutoff)s: older than this goes; %(n)s: the batch size. Each picks its batch oldest first, so
# that the plan walks the time index from its start (where pruned rows are already gone) rather
# than a primary key past every row pruned before; it deletes by primary key.


def _delete_older(table: str, time_col: str, key: str = "id") -> str:
    return (
        f"DELETE FROM {table} WHERE {key} = ANY(ARRAY(SELECT {key} FROM {table}"
        f" WHERE {time_col} < %(cutoff)s ORDER BY {time_col} LIMIT %(n)s))"
    )


def _forget_files(kind: str, *, after_transcription: bool = False) -> str:
    """Forget one kind of file (`original`, `prepared`) of calls ready before the cutoff: listed
    in audio_file_trash and its path cleared, in one statement. after_transcription: only once
    the call's transcription finished (done, or failed for good); ready_at < cutoff holds for
    those and keeps the read on the index of files still kept."""
    join, finished = "", ""
    if after_transcription:
        join = " JOIN call_transcription t ON t.call_id = a.call_id"
        finished = " AND t.state IN ('done', 'failed') AND t.finished_at < %(cutoff)s"
    return f"""
WITH doomed AS (
    SELECT a.call_id, a.{kind}_path AS path FROM call_audio a{join}
     WHERE a.state = 'ready' AND a.{kind}_path IS NOT NULL AND a.ready_at < %(cutoff)s{finished}
     ORDER BY a.ready_at LIMIT %(n)s FOR UPDATE OF a SKIP LOCKED
), listed AS (
    INSERT INTO audio_file_trash (key, call_id) SELECT path, call_id FROM doomed
    ON CONFLICT (key) DO NOTHING
)
UPDATE call_audio a SET {kind}_path = NULL, {kind}_pruned_at = now()
  FROM doomed d WHERE a.call_id = d.call_id
"""


_PRUNE_ORIGINALS = _forget_files("original")
_PRUNE_PREPARED = _forget_files("prepared", after_transcription=True)
# A call goes with its audio row, attempts, transcription row and transcript (ON DELETE
# CASCADE); its files are listed in the same transaction.
_PRUNE_CALLS = """
WITH doomed AS (
    SELECT id FROM bcfy_calls_raw
     WHERE started_at < %(cutoff)s AND created_at < %(cutoff)s
     ORDER BY started_at LIMIT %(n)s FOR UPDATE SKIP LOCKED
), listed AS (
    INSERT INTO audio_file_trash (key, call_id)
    SELECT f.key, a.call_id
      FROM call_audio a JOIN doomed d ON d.id = a.call_id,
           unnest(ARRAY[a.original_path, a.prepared_path]) AS f(key)
     WHERE f.key IS NOT NULL
    ON CONFLICT (key) DO NOTHING
)
DELETE FROM bcfy_calls_raw c USING doomed d WHERE c.id = d.id
"""


@dataclass(frozen=True)
class Prune:
    kind: str
    setting: str  # the variable of its retention in days (Settings.value)
    sql: str
    lists_files: bool = False  # puts files in audio_file_trash


PRUNES = (
    Prune("original_audio", "RETENTION_ORIGINAL_AUDIO_DAYS", _PRUNE_ORIGINALS, True),
    Prune("prepared_audio", "RETENTION_PREPARED_AUDIO_DAYS", _PRUNE_PREPARED, True),
    Prune("calls", "RETENTION_CALLS_DAYS", _PRUNE_CALLS, True),
    Prune("transcripts", "RETENTION_TRANSCRIPTS_DAYS", _delete_older("transcripts", "created_at")),
    Prune(
        "audio_attempts",
        "RETENTION_AUDIO_ATTEMPTS_DAYS",
        _delete_older("call_audio_attempts", "started_at"),
    ),
    Prune(
        "quarantine",
        "RETENTION_QUARANTINE_DAYS",
        _delete_older("bcfy_calls_quarantine", "created_at"),
    ),
    Prune(
        "poll_log",
        "RETENTION_POLL_LOG_DAYS",
        _delete_older("bcfy_playlist_poll_log", "poll_started_at"),
    ),
    Prune("job_runs", "RETENTION_JOB_RUNS_DAYS", _delete_older("job_runs", "started_at")),
)


async def prune(run: Run) -> None:
    async with db_connection() as conn:
        now = await db_now(conn)
        counted_upto = await (
            await conn.execute(
                "SELECT min(upto), count(*) FROM history_checkpoints WHERE kind = ANY(%s)",
                ([c.kind for c in COUNTERS],),
            )
        ).fetchone()
    oldest, kinds = counted_upto if counted_upto else (None, 0)
    if kinds < len(COUNTERS) or oldest is None:
        log.warning("maintenance: counters not folded yet; nothing pruned this run")
        return
    for p in PRUNES:
        days = float(run.s.value(p.setting))
        if days <= 0:
            continue  # kept for ever
        cutoff = min(now - timedelta(seconds=days * DAY), oldest)
        while n := await _prune_batch(run, p, cutoff):
            run.report.add(p.kind, n)
            if p.lists_files:
                await empty_trash(run)  # keep the list short: its files go now
            if n < run.batch:
                break
            await run.next_batch()


async def _prune_batch(run: Run, p: Prune, cutoff: datetime) -> int:
    run.ensure_lock()
    async with db_connection() as conn:
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        try:
            cur = await conn.execute(p.sql, {"cutoff": cutoff, "n": run.batch})
        except psycopg.errors.LockNotAvailable:
            log.warning("maintenance: %s: rows locked by other work; next run", p.kind)
            await conn.rollback()
            return 0
        return cur.rowcount
