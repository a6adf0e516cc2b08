"""The audio claim: which calls are due, their leases, their attempts, and worker deaths.

A pass (tasks.audio.jobs.process_pending_audio) leases up to AUDIO_WORKER_BATCH_SIZE due calls
to one claim, its owner a fresh token, never more than AUDIO_MAX_IN_FLIGHT at once, and splits
them into tasks. The task that receives them takes over the calls still leased to its claim,
renews their leases while it works, and counts the deaths of the processes that worked on them
before it (take_over says how). Everything here is PostgreSQL: the files are preparation's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow

from workers.core.identity import process_is_gone
from workers.core.runtime import db_connection
from workers.core.settings import Settings

log = logging.getLogger(__name__)


# --- the claim pass: which calls are due ----------------------------------------------------

# A call whose lease ran out on its last allowed attempt: its worker died on it every time.
FAIL_EXHAUSTED_LEASES = """
UPDATE call_audio c
   SET state = 'failed', error_code = 'worker_lost',
       last_error = 'the worker died during attempt ' || c.attempts
                    || ' (lease of ' || c.lease_owner || ' ran out); no attempts left',
       lease_until = NULL, next_attempt_at = now(), updated_at = now()
 WHERE c.call_id IN (SELECT call_id FROM call_audio
                      WHERE state = 'downloading' AND next_attempt_at <= now()
                        AND attempts >= %(max_attempts)s
                      FOR UPDATE SKIP LOCKED)
RETURNING c.call_id
"""

# Due: pending past its backoff, or downloading with its lease run out (next_attempt_at is kept
# equal to lease_until while downloading). Room: the in-flight cap less the live leases.
# Always one row, (room, claimed ids): a pass that claims nothing still learns its room, so
# "nothing due" is not taken for "cap reached".
CLAIM = """
WITH room AS (
    SELECT GREATEST(0, LEAST(%(batch)s, %(max_in_flight)s - (
        SELECT count(*) FROM call_audio WHERE state = 'downloading' AND lease_until > now()
    ))) AS n
), due AS (
    SELECT call_id FROM call_audio
     WHERE state IN ('pending', 'downloading') AND next_attempt_at <= now()
     ORDER BY next_attempt_at, call_id
     LIMIT (SELECT n FROM room)
     FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE call_audio c
       SET state = 'downloading', attempts = c.attempts + 1, lease_owner = %(owner)s,
           lease_until = now() + make_interval(secs => %(lease)s),
           next_attempt_at = now() + make_interval(secs => %(lease)s), updated_at = now()
      FROM due
     WHERE c.call_id = due.call_id
    RETURNING c.call_id
)
SELECT (SELECT n FROM room), coalesce(array_agg(call_id ORDER BY call_id), '{}') FROM claimed
"""

# Claimed calls whose tasks could not be sent (broker down) go back, as if never claimed.
UNCLAIM = """
UPDATE call_audio
   SET state = 'pending', attempts = attempts - 1, lease_until = NULL, next_attempt_at = now(),
       updated_at = now()
 WHERE call_id = ANY(%(ids)s) AND state = 'downloading' AND lease_owner = %(owner)s
"""


@dataclass(frozen=True)
class AudioClaim:
    """A claim pass's leases: the calls it took for `owner` (the claim's token)."""

    owner: str
    call_ids: list[int]
    room: int  # how many this pass was allowed to claim

    @property
    def full(self) -> bool:
        """It took all it was allowed: more calls may be waiting."""
        return bool(self.call_ids) and len(self.call_ids) >= self.room


async def claim_pending_calls(
    conn: psycopg.AsyncConnection[TupleRow], settings: Settings, owner: str
) -> AudioClaim:
    """Lease up to AUDIO_WORKER_BATCH_SIZE due calls to `owner` (commit to make it count)."""
    cur = await conn.execute(
        CLAIM,
        {
            "batch": settings.audio.worker_batch_size,
            "max_in_flight": settings.audio.max_in_flight,
            "owner": owner,
            "lease": settings.audio.lease_sec,
        },
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate: always one row
    room, call_ids = row
    return AudioClaim(owner, list(call_ids), room)


async def fail_exhausted_leases(
    conn: psycopg.AsyncConnection[TupleRow], settings: Settings
) -> list[int]:
    cur = await conn.execute(FAIL_EXHAUSTED_LEASES, {"max_attempts": settings.audio.max_attempts})
    return [r[0] for r in await cur.fetchall()]


def split_evenly(ids: list[int], most: int) -> list[list[int]]:
    """Chunks of at most `most`, as even as possible (20 by 8 -> 7, 7, 6)."""
    if not ids:
        return []
    count = -(-len(ids) // most)
    size, extra = divmod(len(ids), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        chunks.append(ids[start:end])
        start = end
    return chunks


def calls_per_task(settings: Settings) -> int:
    """Twice the downloads a process runs at once: while the first calls are being converted
    (CPU), the next ones are already downloading (network), in the same process."""
    return 2 * settings.audio.download_concurrency


# --- the claim as its task holds it ---------------------------------------------------------

# The leases of these calls still held by `owner`, renewed.
RENEW = """
UPDATE call_audio
   SET lease_until = now() + make_interval(secs => %(lease)s),
       next_attempt_at = now() + make_interval(secs => %(lease)s), updated_at = now()
 WHERE call_id = ANY(%(ids)s) AND state = 'downloading' AND lease_owner = %(owner)s
"""

# A task starting on its calls: those still leased to its claim, locked while it takes them over.
HELD = """
SELECT c.call_id, c.attempts, r.url, r.duration_sec, r.playlist_uuid, r.started_at,
       r.size_bytes
  FROM call_audio c JOIN bcfy_calls_raw r ON r.id = c.call_id
 WHERE c.call_id = ANY(%(ids)s) AND c.state = 'downloading' AND c.lease_owner = %(owner)s
 ORDER BY c.call_id
   FOR UPDATE OF c
"""

# The claim's attempts that never ended: some process was working on them when it stopped.
OPEN_ATTEMPTS = """
SELECT id, call_id, worker FROM call_audio_attempts
 WHERE call_id = ANY(%(ids)s) AND lease_owner = %(owner)s AND ended_at IS NULL
 ORDER BY id
"""

CLOSE_LOST_ATTEMPTS = """
UPDATE call_audio_attempts
   SET ended_at = now(), outcome = 'worker_lost', error_code = 'worker_lost', error = %(error)s
 WHERE id = ANY(%(ids)s)
"""

# A death that counts: the next attempt is a new one.
COUNT_DEATH = """
UPDATE call_audio
   SET attempts = attempts + 1, error_code = 'worker_lost', last_error = %(error)s,
       updated_at = now()
 WHERE call_id = %(call_id)s
RETURNING attempts
"""

# A call out of its lease: back to pending after `delay` (a retry), or failed for good.
MARK_FAILED = """
UPDATE call_audio
   SET state = %(state)s, lease_until = NULL,
       next_attempt_at = now() + make_interval(secs => %(delay)s),
       error_code = %(code)s, last_error = %(error)s, updated_at = now()
 WHERE call_id = %(call_id)s
"""


@dataclass
class ClaimedCall:
    call_id: int
    attempt: int
    url: str
    duration_sec: float | None
    playlist_uuid: UUID | None
    started_at: datetime
    expected_bytes: int | None  # the record's `size`, when the service gave one
    attempt_id: int | None = None  # its call_audio_attempts row, once started
    download_ms: int | None = None
    prepare_ms: int | None = None
    bytes: int | None = None


@dataclass
class TakeOver:
    calls: list[ClaimedCall]  # to prepare
    # failed as worker_lost: a process died on their last attempt
    lost_calls: list[int] = field(default_factory=list)
    after_death: bool = False  # a process died working on this task

    @property
    def lost(self) -> int:
        return len(self.lost_calls)


@dataclass(frozen=True)
class HeldClaim:
    """A claim as the task that received it holds it: its calls' leases and attempts."""

    s: Settings
    owner: str

    async def take_over(self, call_ids: list[int]) -> TakeOver:
        """Take over the calls still leased to this claim (skip the rest), in one transaction.

        A task is delivered again with the same claim when the pool process working on it died
        (task_reject_on_worker_lost; a whole worker's death, or one still working past the
        broker's visibility timeout, leaves the lease to run out instead). The attempts that
        process left open tell what it was doing when it died:
          - an open attempt of a live process, or of one on another host: the task is still
            (or may be) worked on there: drop this delivery; if that process is in fact gone,
            the leases run out and the calls are claimed again (that counts an attempt);
          - a process that died with one call open died on that call: the death counts as its
            attempt. After AUDIO_MAX_ATTEMPTS the call fails as worker_lost; else it gets a
            new attempt;
          - a process that died with several calls open cannot say which one killed it: the
            death counts against none of them, and this task works its calls one at a time, so
            the next death has a single suspect.
        A call whose process did not reach it (no open attempt) is simply prepared. The files
        a dead process was writing for the calls that fail are the caller's to discard."""
        params = {"ids": call_ids, "owner": self.owner}
        async with db_connection() as conn:
            rows = await (await conn.execute(HELD, params)).fetchall()
            left_open = await (await conn.execute(OPEN_ATTEMPTS, params)).fetchall()
            busy = sorted({w for _, _, w in left_open if not process_is_gone(w)})
            if busy:
                log.warning(
                    "audio: claim %s is being worked on by %s: duplicate delivery dropped",
                    self.owner,
                    ", ".join(busy),
                )
                return TakeOver([])
            dead = left_open  # every process that left an attempt open is gone
            calls = {row[0]: ClaimedCall(*row) for row in rows}  # attempt: so far
            lost = await self.count_deaths(conn, calls, dead)
            if calls:
                await conn.execute(
                    RENEW, params | {"ids": list(calls), "lease": self.s.audio.lease_sec}
                )
        return TakeOver(list(calls.values()), lost, after_death=bool(dead))

    async def count_deaths(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        calls: dict[int, ClaimedCall],
        dead: list[tuple[int, int, str]],
    ) -> list[int]:
        """Close the attempts dead processes left open and count each death that has one
        suspect; fail (and drop from `calls`) those with no attempts left, and return them."""
        open_calls: dict[str, int] = {}
        for _, _, worker in dead:
            open_calls[worker] = open_calls.get(worker, 0) + 1
        lost: list[int] = []
        for attempt_id, call_id, worker in dead:
            call = calls.get(call_id)
            if call is None:
                continue  # no longer this claim's: not ours to record
            n = open_calls[worker]
            if n > 1:
                why = (
                    f"the worker process {worker} died while working on {n} calls: not"
                    " counted against any; each is tried again alone"
                )
            else:
                why = (
                    f"the worker process {worker} died during attempt {call.attempt} of"
                    f" {self.s.audio.max_attempts} (killed, or crashed on this call)"
                )
            await conn.execute(CLOSE_LOST_ATTEMPTS, {"ids": [attempt_id], "error": why})
            log.warning("audio: call %s: %s", call_id, why)
            if n > 1:
                continue
            if call.attempt >= self.s.audio.max_attempts:
                await conn.execute(
                    MARK_FAILED,
                    {
                        "call_id": call_id,
                        "state": "failed",
                        "delay": 0.0,
                        "code": "worker_lost",
                        "error": f"{why}; no attempts left",
                    },
                )
                del calls[call_id]
                lost.append(call_id)
                continue
            cur = await conn.execute(COUNT_DEATH, {"call_id": call_id, "error": why})
            row = await cur.fetchone()
            assert row is not None  # the row is locked (HELD)
            call.attempt = row[0]
        return lost

    async def renew_leases(self, in_progress: set[int]) -> None:
        """Keep the leases of unfinished calls (`in_progress`, which the task empties as it
        goes) alive while this task works on them."""
        every = self.s.audio.lease_sec / 3
        while True:
            await asyncio.sleep(every)
            ids = sorted(in_progress)
            if not ids:
                return
            try:
                async with db_connection() as conn:
                    await conn.execute(
                        RENEW, {"ids": ids, "owner": self.owner, "lease": self.s.audio.lease_sec}
                    )
            except Exception as exc:
                log.warning("audio: could not renew leases of %s: %s", ids, exc)
