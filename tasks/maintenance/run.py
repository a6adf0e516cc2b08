"""One maintenance run's state, shared by its steps: settings, the time budget, the lock check,
the batch size, the audio store and what the run did."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg.rows import TupleRow

from workers.audio.store import store_for
from workers.core.settings import Settings


@dataclass
class Report:
    """What one run did: rows (or files) per kind, and whether it stopped on its budget."""

    pruned: dict[str, int] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    files_removed: int = 0
    out_of_time: bool = False

    def add(self, kind: str, n: int) -> None:
        self.pruned[kind] = self.pruned.get(kind, 0) + n


class OutOfTime(Exception):
    """The run's time budget is spent: it stops before its next batch."""


class Run:
    def __init__(
        self, settings: Settings, deadline: float | None, ensure_lock: Callable[[], None]
    ) -> None:
        self.s = settings
        self.deadline = deadline
        self.ensure_lock = ensure_lock
        self.report = Report()
        self.store = store_for(settings)
        self.batch = settings.retention.batch_size

    async def next_batch(self, pause: bool = True) -> None:
        """Between two batches: give way to other work, and stop when the budget is spent."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise OutOfTime
        self.ensure_lock()
        await asyncio.sleep(self.s.retention.batch_pause_sec if pause else 0)


async def db_now(conn: psycopg.AsyncConnection[TupleRow]) -> datetime:
    row = await (await conn.execute("SELECT now()")).fetchone()
    assert row is not None
    value: datetime = row[0]
    return value
