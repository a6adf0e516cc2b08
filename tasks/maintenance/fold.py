"""The all-time counters (workers.core.counters) folded into history_totals, so that they do
not drop when rows go. Rows are only pruned once their counters are folded: every prune's
cutoff is at most the oldest counter checkpoint (tasks.maintenance.rows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tasks.maintenance.run import Run, db_now
from workers.core.counters import COUNTERS, Counter
from workers.core.runtime import db_connection
from workers.core.settings import Settings

# Rows younger than this are not folded into the counters yet: every kind's time column is set
# within a run's hard time limit of its commit, so nothing can still appear behind a checkpoint.
FOLD_MIN_MARGIN_SEC = 3600.0


def fold_margin(settings: Settings) -> float:
    return max(
        FOLD_MIN_MARGIN_SEC,
        2 * settings.jobs.time_limit_sec,
        2 * settings.transcription.time_limit_sec,
    )


async def fold_counters(run: Run) -> None:
    async with db_connection() as conn:
        now = await db_now(conn)
    until = now - timedelta(seconds=fold_margin(run.s))
    for counter in COUNTERS:
        while await _fold_batch(run, counter, until):
            await run.next_batch(pause=False)


async def _fold_batch(run: Run, c: Counter, until: datetime) -> bool:
    """Count the next rows after the kind's checkpoint into history_totals and move the
    checkpoint past them, in one transaction. False once it reached `until`."""
    n = run.batch * 25  # counting is far cheaper than deleting
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
    run.report.folded[c.kind] = run.report.folded.get(c.kind, 0) + counted
    return end < until
