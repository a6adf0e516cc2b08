"""Retention: the `maintenance` job prunes each kind of history after its RETENTION_* setting.

Each run, in this order, until the work is done or its time budget is spent (the rest waits for
the next run; nothing depends on one run finishing):

  1. remove the files listed in audio_file_trash (left over by a run that stopped in between);
  2. fold the all-time counters (workers.cli.status.COUNTERS) forward to `now - FOLD_MARGIN`, so the
     metrics endpoint's counters do not drop when rows go;
  3. prune, oldest first, RETENTION_BATCH_SIZE rows per transaction with a pause in between:
     original files, prepared files, calls (when set), transcripts (when set), audio attempts,
     quarantine, the poll log, job runs;
  4. remove the files those batches listed.

Files go with their rows. The transaction that NULLs a path column (or deletes the call) also
lists the file in audio_file_trash; the file is removed after the commit, then its entry. A crash
between the two leaves an entry whose file is removed by the next run (a missing file is fine):
never a row pointing to a missing file, never a file no table knows about. Removing the files
first and then NULLing the rows would, after a crash, leave rows pointing to missing files; NULLing
without a list would leave files nobody can find.

Rows are only pruned once their counters are folded: every prune's cutoff is at most the oldest
counter checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tasks.audio.preparation import store_for
from workers.cli.status import COUNTERS, Counter
from workers.core.jobs import JobContext, periodic_job
from workers.core.runtime import db_connection
from workers.core.settings import Settings

log = logging.getLogger(__name__)

DAY = 86400.0
# Rows younger than this are not folded into the counters yet: every kind's time column is set
# within a run's hard time limit of its commit, so nothing can still appear behind a checkpoint.
FOLD_MIN_MARGIN_SEC = 3600.0
# A pruning transaction never waits long for a lock some worker holds; it tries again next run.
LOCK_TIMEOUT = "2s"


@dataclass
class Report:
    """What one run did: rows (or files) per kind, and whether it stopped on its budget."""

    pruned: dict[str, int] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    files_removed: int = 0
    out_of_time: bool = False

    def add(self, kind: str, n: int) -> None:
        self.pruned[kind] = self.pruned.get(kind, 0) + n


class _OutOfTime(Exception):
    pass


@periodic_job("tasks.maintenance.prune_history")
async def prune_history(ctx: JobContext) -> None:
    """Prune history after its retention settings (see the module's docstring)."""
    budget = 0.8 * ctx.settings.job_soft_time_limit_sec
    report = await run_maintenance(
        ctx.settings, deadline=time.monotonic() + budget, ensure_lock=ctx.ensure_lock
    )
    log.info(
        "maintenance: pruned %s; %d files removed; counters folded %s%s",
        ", ".join(f"{k} {n}" for k, n in report.pruned.items()) or "nothing",
        report.files_removed,
        ", ".join(f"{k} {n}" for k, n in report.folded.items() if n) or "(none new)",
        "; time budget spent, the rest next run" if report.out_of_time else "",
    )


def fold_margin(settings: Settings) -> float:
    return max(
        FOLD_MIN_MARGIN_SEC, 2 * settings.job_time_limit_sec, 2 * settings.transcribe_time_limit_sec
    )


async def run_maintenance(
    settings: Settings,
    *,
    deadline: float | None = None,
    ensure_lock: Callable[[], None] = lambda: None,
) -> Report:
    """One maintenance pass (the job's body, callable on its own). `deadline` is a
    time.monotonic() value: no new batch starts after it."""
    run = _Run(settings, deadline, ensure_lock)
    try:
        await run.empty_trash()
        await run.fold_counters()
        await run.prune()
        await run.empty_trash()
    except _OutOfTime:
        run.report.out_of_time = True
    return run.report


# --- the deletes: one batch each, in its own transaction ---------------------------------------
# %(cutoff)s: older than this goes; %(n)s: the batch size. Each picks its batch oldest first, so
# that the plan walks the time index from its start (where pruned rows are already gone) rather
# than a primary key past every row pruned before; it deletes by primary key.


def _delete_older(table: str, time_col: str, key: str = "id") -> str:
    return (
        f"DELETE FROM {table} WHERE {key} = ANY(ARRAY(SELECT {key} FROM {table}"
        f" WHERE {time_col} < %(cutoff)s ORDER BY {time_col} LIMIT %(n)s))"
    )


_PRUNE_ORIGINALS = """
WITH doomed AS (
    SELECT call_id, original_path FROM call_audio
     WHERE state = 'ready' AND original_path IS NOT NULL AND ready_at < %(cutoff)s
     ORDER BY ready_at LIMIT %(n)s FOR UPDATE SKIP LOCKED
), listed AS (
    INSERT INTO audio_file_trash (key, call_id) SELECT original_path, call_id FROM doomed
    ON CONFLICT (key) DO NOTHING
)
UPDATE call_audio a SET original_path = NULL, original_pruned_at = now()
  FROM doomed d WHERE a.call_id = d.call_id
"""
# After its transcription finished (done, or failed for good); ready_at < cutoff holds for
# those and keeps the read on the index of files still kept.
_PRUNE_PREPARED = """
WITH doomed AS (
    SELECT a.call_id, a.prepared_path FROM call_audio a
      JOIN call_transcription t ON t.call_id = a.call_id
     WHERE a.state = 'ready' AND a.prepared_path IS NOT NULL AND a.ready_at < %(cutoff)s
       AND t.state IN ('done', 'failed') AND t.finished_at < %(cutoff)s
     ORDER BY a.ready_at LIMIT %(n)s FOR UPDATE OF a SKIP LOCKED
), listed AS (
    INSERT INTO audio_file_trash (key, call_id) SELECT prepared_path, call_id FROM doomed
    ON CONFLICT (key) DO NOTHING
)
UPDATE call_audio a SET prepared_path = NULL, prepared_pruned_at = now()
  FROM doomed d WHERE a.call_id = d.call_id
"""
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
    setting: str  # the Settings attribute with its retention in days
    sql: str
    lists_files: bool = False  # puts files in audio_file_trash


PRUNES = (
    Prune("original_audio", "retention_original_audio_days", _PRUNE_ORIGINALS, True),
    Prune("prepared_audio", "retention_prepared_audio_days", _PRUNE_PREPARED, True),
    Prune("calls", "retention_calls_days", _PRUNE_CALLS, True),
    Prune("transcripts", "retention_transcripts_days", _delete_older("transcripts", "created_at")),
    Prune(
        "audio_attempts",
        "retention_audio_attempts_days",
        _delete_older("call_audio_attempts", "started_at"),
    ),
    Prune(
        "quarantine",
        "retention_quarantine_days",
        _delete_older("bcfy_calls_quarantine", "created_at"),
    ),
    Prune(
        "poll_log",
        "retention_poll_log_days",
        _delete_older("bcfy_playlist_poll_log", "poll_started_at"),
    ),
    Prune("job_runs", "retention_job_runs_days", _delete_older("job_runs", "started_at")),
)


class _Run:
    def __init__(
        self, settings: Settings, deadline: float | None, ensure_lock: Callable[[], None]
    ) -> None:
        self.s = settings
        self.deadline = deadline
        self.ensure_lock = ensure_lock
        self.report = Report()
        self.store = store_for(settings)
        self.batch = settings.retention_batch_size

    async def _next_batch(self, pause: bool = True) -> None:
        """Between two batches: give way to other work, and stop when the budget is spent."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _OutOfTime
        self.ensure_lock()
        await asyncio.sleep(self.s.retention_batch_pause_sec if pause else 0)

    # --- counters -----------------------------------------------------------------------------

    async def fold_counters(self) -> None:
        async with db_connection() as conn:
            now = await _db_now(conn)
        until = now - timedelta(seconds=fold_margin(self.s))
        for counter in COUNTERS:
            while await self._fold_batch(counter, until):
                await self._next_batch(pause=False)

    async def _fold_batch(self, c: Counter, until: datetime) -> bool:
        """Count the next rows after the kind's checkpoint into history_totals and move the
        checkpoint past them, in one transaction. False once it reached `until`."""
        n = self.batch * 25  # counting is far cheaper than deleting
        async with db_connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT upto FROM history_checkpoints WHERE kind = %s FOR UPDATE", (c.kind,)
                )
            ).fetchone()
            start = row[0] if row else datetime.min.replace(tzinfo=UTC)
            if start >= until:
                return False
            # The batch ends at the time of its n-th row (all rows at that instant included).
            end_row = await (
                await conn.execute(
                    f"SELECT {c.time} FROM {c.table} WHERE {c.where} AND {c.time} > %s"
                    f" AND {c.time} <= %s ORDER BY {c.time} OFFSET %s LIMIT 1",
                    (start, until, n - 1),
                )
            ).fetchone()
            end = end_row[0] if end_row else until
            cur = await conn.execute(
                f"WITH c AS (SELECT %s AS kind, {c.label} AS label, {c.outcome} AS outcome,"
                f" count(*) AS n FROM {c.table}"
                f" WHERE {c.where} AND {c.time} > %s AND {c.time} <= %s GROUP BY 2, 3),"
                " ins AS (INSERT INTO history_totals (kind, label, outcome, n)"
                " SELECT * FROM c ON CONFLICT (kind, label, outcome)"
                " DO UPDATE SET n = history_totals.n + EXCLUDED.n)"
                " SELECT coalesce(sum(n), 0)::bigint FROM c",
                (c.kind, start, end),
            )
            counted = (await cur.fetchone() or (0,))[0]
            await conn.execute(
                "INSERT INTO history_checkpoints (kind, upto) VALUES (%s, %s)"
                " ON CONFLICT (kind) DO UPDATE SET upto = EXCLUDED.upto",
                (c.kind, end),
            )
        self.report.folded[c.kind] = self.report.folded.get(c.kind, 0) + counted
        return end < until

    # --- pruning ------------------------------------------------------------------------------

    async def prune(self) -> None:
        async with db_connection() as conn:
            now = await _db_now(conn)
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
            days = float(getattr(self.s, p.setting))
            if days <= 0:
                continue  # kept for ever
            cutoff = min(now - timedelta(seconds=days * DAY), oldest)
            while n := await self._prune_batch(p, cutoff):
                self.report.add(p.kind, n)
                if p.lists_files:
                    await self.empty_trash()  # keep the list short: its files go now
                if n < self.batch:
                    break
                await self._next_batch()

    async def _prune_batch(self, p: Prune, cutoff: datetime) -> int:
        self.ensure_lock()
        async with db_connection() as conn:
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            try:
                cur = await conn.execute(p.sql, {"cutoff": cutoff, "n": self.batch})
            except psycopg.errors.LockNotAvailable:
                log.warning("maintenance: %s: rows locked by other work; next run", p.kind)
                await conn.rollback()
                return 0
            return cur.rowcount

    # --- files --------------------------------------------------------------------------------

    async def empty_trash(self) -> None:
        while await self._trash_batch():
            await self._next_batch()

    async def _trash_batch(self) -> int:
        """Remove the next listed files, then their entries. A file a call_audio row names
        again (the same key written anew) is kept: only the entry goes."""
        async with db_connection() as conn:
            rows = await (
                await conn.execute(
                    """SELECT t.key, EXISTS (SELECT 1 FROM call_audio a WHERE a.call_id = t.call_id
                                 AND t.key IN (a.original_path, a.prepared_path))
                         FROM audio_file_trash t ORDER BY t.key LIMIT %s""",
                    (self.batch,),
                )
            ).fetchall()
        if not rows:
            return 0
        doomed = [key for key, referenced in rows if not referenced]
        removed = await asyncio.get_running_loop().run_in_executor(None, self._remove, doomed)
        self.ensure_lock()
        async with db_connection() as conn:
            await conn.execute(
                "DELETE FROM audio_file_trash WHERE key = ANY(%s)", ([k for k, _ in rows],)
            )
        self.report.files_removed += removed
        return len(rows)

    def _remove(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            try:
                path = self.store.local_path(key)
            except ValueError:
                log.error("maintenance: %r is outside the audio store; entry dropped", key)
                continue
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # removed before a crash, or by hand: the row already says it is gone
        return removed


async def _db_now(conn: psycopg.AsyncConnection[Any]) -> datetime:
    row = await (await conn.execute("SELECT now()")).fetchone()
    assert row is not None
    value: datetime = row[0]
    return value
