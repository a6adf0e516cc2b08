"""Audio: claim pending calls, download, validate, convert and store their audio.

Two tasks on the `audio` queue:

  tasks.audio.process_pending_audio   the periodic job (every AUDIO_WORKER_INTERVAL_SEC, and at
        once when ingest stores new calls). A singleton, but it only *claims*: in one committed
        transaction it takes up to AUDIO_WORKER_BATCH_SIZE due calls (FOR UPDATE SKIP LOCKED),
        gives them a lease (owner, until) and sends them out as a few prepare_calls tasks. It
        returns in milliseconds, so it never holds a pool process the downloads need.

  tasks.audio.prepare_calls(call_ids, owner, more)   a handful of claimed calls, on whichever
        audio pool process is free (late acks, prefetch 1: an idle process on any host takes
        the next one, so two workers download about twice as fast as one). A task holds up to
        twice AUDIO_DOWNLOAD_CONCURRENCY calls and downloads that many at once; each call is
        validated and converted in an executor as soon as it has arrived (while the next ones
        download), stored, and marked ready or failed. While it works, the task renews the
        leases; it writes an outcome only while it still holds the lease (checked under a row
        lock), so a call whose worker was presumed dead and which was claimed again is never
        written twice. A call already ready is skipped, so a redelivered task does no harm.

Backlog: no more than AUDIO_MAX_IN_FLIGHT calls are leased at once; the rest wait in PostgreSQL.
A pass that claimed all it was allowed marks its first task `more`, which asks for the next
pass as it starts: the next batch is queued while this one is worked on. A pass that finds the
cap reached leaves a note in Redis, and the next task to finish (having made room) asks for a
pass. So a backlog is worked off at the pool's pace, not the tick's.

Failures: each attempt's reason is recorded (error_code, last_error). Policy refusals (scheme,
host, address, size) fail at once; anything else is retried with exponential backoff until
AUDIO_MAX_ATTEMPTS. A worker that dies mid-call leaves its lease to run out; the call is then
claimed again (that counts as an attempt, so a call that kills its worker every time stops).
A pool process that dies (the OOM killer, a crash in a decoder) has its task put back at once,
under the same claim: each attempt is logged as its download starts, naming the process, and
the task's next taker counts the death against the call the dead process was working on
(CallPreparer.take_over says how), so such a call fails as `worker_lost` after
AUDIO_MAX_ATTEMPTS deaths too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from celery import Task

from workers.app import app, settings
from workers.audio.download import AudioFailure, Downloaded, UrlPolicy, download
from workers.audio.prepare import PreparedAudio, validate_and_convert
from workers.audio.store import FilesystemAudioStore, call_keys
from workers.core.jobs import (
    JobContext,
    backstop_time_limits,
    claimant_is_gone,
    periodic_job,
    process_id,
)
from workers.core.locks import new_token
from workers.core.runtime import Runtime, db_connection
from workers.core.settings import Settings

log = logging.getLogger(__name__)

CLAIM_JOB = "tasks.audio.process_pending_audio"
PREPARE_TASK = "tasks.audio.prepare_calls"
# The transcription stage's dispatcher, triggered by name (it belongs to tasks.transcription).
TRANSCRIPTION_DISPATCH = "tasks.transcription.dispatch_ready_calls"
# Set by a pass that found the in-flight cap reached; the next task to finish takes it and asks
# for a pass, since it has just made room.
CLAIM_WANTED_KEY = "bcfy:audio:claim-wanted"


# --- claiming -------------------------------------------------------------------------------

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
class Claim:
    owner: str
    call_ids: list[int]
    room: int  # how many this pass was allowed to claim

    @property
    def full(self) -> bool:
        """It took all it was allowed: more calls may be waiting."""
        return bool(self.call_ids) and len(self.call_ids) >= self.room


async def claim_pending_calls(
    conn: psycopg.AsyncConnection[Any], settings: Settings, owner: str
) -> Claim:
    """Lease up to AUDIO_WORKER_BATCH_SIZE due calls to `owner` (commit to make it count)."""
    cur = await conn.execute(
        CLAIM,
        {
            "batch": settings.audio_worker_batch_size,
            "max_in_flight": settings.audio_max_in_flight,
            "owner": owner,
            "lease": settings.audio_lease_sec,
        },
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate: always one row
    room, call_ids = row
    return Claim(owner, list(call_ids), room)


async def fail_exhausted_leases(
    conn: psycopg.AsyncConnection[Any], settings: Settings
) -> list[int]:
    cur = await conn.execute(FAIL_EXHAUSTED_LEASES, {"max_attempts": settings.audio_max_attempts})
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
    return 2 * settings.audio_download_concurrency


def store_for(settings: Settings) -> FilesystemAudioStore:
    return FilesystemAudioStore(settings.audio_store_dir)


def stale_temp_age(settings: Settings) -> float:
    """A temporary file untouched this long has no live writer: downloads have a deadline and
    their writers renew leases far more often."""
    return 2 * max(settings.audio_lease_sec, settings.http_total_timeout_sec)


@periodic_job(CLAIM_JOB, rerun_on_trigger=True)
async def process_pending_audio(ctx: JobContext) -> None:
    """Claim a batch of due calls and hand them to the audio pool."""
    s = ctx.settings
    loop = asyncio.get_running_loop()
    swept = await loop.run_in_executor(None, store_for(s).sweep_temps, stale_temp_age(s))
    if swept:
        log.warning("audio: removed %d abandoned temporary files", swept)
    owner = new_token()  # a claim's name: readable (host, process) and unique
    async with ctx.connection() as conn:
        lost = await fail_exhausted_leases(conn, s)
        claim = await claim_pending_calls(conn, s, owner)
        ctx.ensure_lock()  # raising here rolls the claim back
    if claim.room == 0:
        ctx.runtime.redis.set(CLAIM_WANTED_KEY, owner, ex=max(1, int(s.audio_lease_sec)))
    if lost:
        log.warning(
            "audio: %d calls failed: their worker died on every attempt: %s", len(lost), lost
        )
    if not claim.call_ids:
        return
    chunks = split_evenly(claim.call_ids, calls_per_task(s))
    sent = 0
    try:
        for chunk in chunks:
            # The first task of a full claim asks for the next pass as it starts, so the next
            # batch is queued while this one is worked on (one request per batch, not per task).
            more = claim.full and sent == 0
            app.send_task(PREPARE_TASK, kwargs={"call_ids": chunk, "owner": owner, "more": more})
            sent += 1
    except Exception:
        unsent = [c for chunk in chunks[sent:] for c in chunk]
        async with ctx.connection() as conn:
            await conn.execute(UNCLAIM, {"ids": unsent, "owner": owner})
        log.exception("audio: could not send %d claimed calls to the pool; released", len(unsent))
        raise
    log.info(
        "audio: claimed %d calls as %s, sent as %d tasks%s",
        len(claim.call_ids),
        owner,
        len(chunks),
        " (more waiting)" if claim.full else "",
    )


# --- preparing claimed calls ----------------------------------------------------------------

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

# Logged and committed as the call's download starts, naming the process: should that process
# die on the call, the next one to take the task over finds the attempt open.
START_ATTEMPT = """
INSERT INTO call_audio_attempts (call_id, attempt, lease_owner, worker)
SELECT call_id, attempts, lease_owner, %(worker)s FROM call_audio
 WHERE call_id = %(call_id)s AND state = 'downloading' AND lease_owner = %(owner)s
RETURNING id, attempt
"""

HOLD_LEASE = """
SELECT attempts FROM call_audio
 WHERE call_id = %(call_id)s AND state = 'downloading' AND lease_owner = %(owner)s
   FOR UPDATE
"""

# Ready, and the attempt's log line, in one statement; the UPDATE keeps the row locked until
# the transaction ends, and the files are moved in between. Returns 0 when the lease was lost.
# Making a call ready also gives it its call_transcription row, or resets one that had failed
# for good (pending, attempts 0, last error cleared): the row triggers
# call_transcription_on_ready_insert/_update on call_audio (sql/004_transcription.sql). So a
# call sent back here by `bcfy audio retry` can restart its transcription (workers/cli/audio.py,
# RETRY_EFFECT).
MARK_READY = """
WITH done AS (
    UPDATE call_audio
       SET state = 'ready', lease_until = NULL, next_attempt_at = now(), error_code = NULL,
           last_error = NULL, original_path = %(original_path)s,
           original_bytes = %(original_bytes)s, original_sha256 = %(original_sha256)s,
           original_codec = %(codec)s, prepared_path = %(prepared_path)s,
           prepared_bytes = %(prepared_bytes)s, prepared_sha256 = %(prepared_sha256)s,
           measured_duration_sec = %(duration)s, ready_at = now(), updated_at = now()
     WHERE call_id = %(call_id)s AND state = 'downloading' AND lease_owner = %(owner)s
    RETURNING call_id
), logged AS (
    UPDATE call_audio_attempts
       SET ended_at = now(),
           outcome = CASE WHEN EXISTS (SELECT 1 FROM done) THEN 'ready' ELSE 'lease_lost' END,
           bytes = %(bytes)s, download_ms = %(download_ms)s, prepare_ms = %(prepare_ms)s
     WHERE id = %(attempt_id)s
)
SELECT count(*) FROM done
"""

MARK_FAILED = """
UPDATE call_audio
   SET state = %(state)s, lease_until = NULL,
       next_attempt_at = now() + make_interval(secs => %(delay)s),
       error_code = %(code)s, last_error = %(error)s, updated_at = now()
 WHERE call_id = %(call_id)s
"""

END_ATTEMPT = """
UPDATE call_audio_attempts
   SET ended_at = now(), outcome = %(outcome)s, error_code = %(code)s, error = %(error)s,
       bytes = %(bytes)s, download_ms = %(download_ms)s, prepare_ms = %(prepare_ms)s
 WHERE id = %(attempt_id)s
"""


@dataclass
class ClaimedCall:
    call_id: int
    attempt: int
    url: str
    duration_sec: float | None
    playlist_uuid: Any
    started_at: datetime
    expected_bytes: int | None  # the record's `size`, when the service gave one
    attempt_id: int | None = None  # its call_audio_attempts row, once started
    download_ms: int | None = None
    prepare_ms: int | None = None
    bytes: int | None = None


@dataclass
class TakeOver:
    calls: list[ClaimedCall]  # to prepare
    lost: int = 0  # failed as worker_lost: a process died on their last attempt
    after_death: bool = False  # a process died working on this task


@dataclass
class ChunkOutcome:
    ready: int = 0
    retry: int = 0
    failed: int = 0
    lease_lost: int = 0
    skipped: int = 0  # not ours any more (ready already, or claimed again) when the task began
    unrecorded: int = 0  # the outcome could not be written (database down): the lease runs out


def backoff_sec(settings: Settings, attempts: int, retry_after: float | None = None) -> float:
    """Delay before the next attempt after `attempts` attempts."""
    delay = settings.audio_retry_base_sec * 2 ** max(attempts - 1, 0)
    delay = min(delay, settings.audio_retry_max_sec)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.audio_retry_max_sec))
    return delay


def diagnose_short_body(call: ClaimedCall, failure: AudioFailure) -> AudioFailure:
    """A body shorter than the record's `size` that then fails to decode, or decodes short, was
    cut off: say so. (The size alone never rejects a call: it is not always given, nor sure.)"""
    if (
        failure.code in ("not_audio", "duration_mismatch")
        and call.expected_bytes
        and call.bytes is not None
        and call.bytes < call.expected_bytes
    ):
        return AudioFailure(
            "truncated",
            f"received {call.bytes} of the {call.expected_bytes} bytes the service announced"
            f" ({failure.detail})",
        )
    return failure


class CallPreparer:
    """Prepares one task's claimed calls on this process's loop, HTTP client and pool."""

    def __init__(self, settings: Settings, http: Any, owner: str, worker: str) -> None:
        self.s = settings
        self.http = http
        self.owner = owner
        self.worker = worker
        self.store = store_for(settings)
        self.policy = UrlPolicy(
            tuple(settings.audio_allowed_hosts), tuple(settings.audio_allowed_internal_networks)
        )
        self.slots = asyncio.Semaphore(settings.audio_download_concurrency)
        self.in_progress: set[int] = set()

    async def run(self, call_ids: list[int]) -> ChunkOutcome:
        outcome = ChunkOutcome()
        taken = await self.take_over(call_ids)
        calls = taken.calls
        outcome.failed = taken.lost
        outcome.skipped = len(call_ids) - len(calls) - taken.lost
        if not calls:
            return outcome
        self.in_progress = {c.call_id for c in calls}
        renewer = asyncio.create_task(self.renew_leases())
        try:
            if taken.after_death:
                # One at a time: should the process die again, it dies on one call, which
                # is then surely the one that kills it.
                results = [await self.prepare(c) for c in calls]
            else:
                results = await asyncio.gather(*(self.prepare(c) for c in calls))
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        for result in results:
            setattr(outcome, result, getattr(outcome, result) + 1)
        return outcome

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
        A call whose process did not reach it (no open attempt) is simply prepared."""
        params = {"ids": call_ids, "owner": self.owner}
        async with db_connection() as conn:
            rows = await (await conn.execute(HELD, params)).fetchall()
            left_open = await (await conn.execute(OPEN_ATTEMPTS, params)).fetchall()
            busy = sorted({w for _, _, w in left_open if not claimant_is_gone(w)})
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
                    RENEW, params | {"ids": list(calls), "lease": self.s.audio_lease_sec}
                )
        loop = asyncio.get_running_loop()
        for call_id in lost:  # what the dead process was writing for it
            await loop.run_in_executor(None, self.store.discard_temps, call_id)
        return TakeOver(list(calls.values()), len(lost), after_death=bool(dead))

    async def count_deaths(
        self,
        conn: psycopg.AsyncConnection[Any],
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
                    f" {self.s.audio_max_attempts} (killed, or crashed on this call)"
                )
            await conn.execute(CLOSE_LOST_ATTEMPTS, {"ids": [attempt_id], "error": why})
            log.warning("audio: call %s: %s", call_id, why)
            if n > 1:
                continue
            if call.attempt >= self.s.audio_max_attempts:
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

    async def renew_leases(self) -> None:
        """Keep the leases of unfinished calls alive while this task works on them."""
        every = self.s.audio_lease_sec / 3
        while True:
            await asyncio.sleep(every)
            ids = sorted(self.in_progress)
            if not ids:
                return
            try:
                async with db_connection() as conn:
                    await conn.execute(
                        RENEW, {"ids": ids, "owner": self.owner, "lease": self.s.audio_lease_sec}
                    )
            except Exception as exc:
                log.warning("audio: could not renew leases of %s: %s", ids, exc)

    async def prepare(self, call: ClaimedCall) -> str:
        """Download, validate, convert and store one call. Returns its outcome's name; never
        raises (one call's failure never stops its batch)."""
        try:
            return await self.prepare_or_raise(call)
        except Exception:
            log.exception(
                "audio: call %s: its outcome could not be recorded; it is claimed again when "
                "its lease runs out",
                call.call_id,
            )
            return "unrecorded"

    async def prepare_or_raise(self, call: ClaimedCall) -> str:
        loop = asyncio.get_running_loop()
        original = flac = None
        try:
            original, flac = await loop.run_in_executor(None, self.fresh_temps, call.call_id)
            async with self.slots:
                if not await self.start_attempt(call):
                    return "lease_lost"
                got = await self.download(call, original)
            started = time.monotonic()
            prepared = await loop.run_in_executor(
                None,
                functools.partial(
                    validate_and_convert,
                    original,
                    flac,
                    expected_duration=call.duration_sec,
                    tolerance=self.s.audio_duration_tolerance,
                    silence_dbfs=self.s.audio_silence_dbfs,
                    max_duration_sec=self.s.audio_max_duration_sec,
                ),
            )
            call.prepare_ms = int((time.monotonic() - started) * 1000)
            return await self.mark_ready(call, got, prepared, original, flac)
        except AudioFailure as failure:
            return await self.mark_failed(call, diagnose_short_body(call, failure))
        except Exception as exc:
            log.exception("audio: call %s: unexpected error", call.call_id)
            return await self.mark_failed(
                call, AudioFailure("internal", f"{type(exc).__name__}: {exc}")
            )
        finally:
            self.in_progress.discard(call.call_id)
            self.store.discard(original, flac)

    async def start_attempt(self, call: ClaimedCall) -> bool:
        """Log the call's attempt, committed before its download starts (the risky work:
        download, decode); False when the lease is no longer ours."""
        async with db_connection() as conn:
            cur = await conn.execute(
                START_ATTEMPT,
                {"call_id": call.call_id, "owner": self.owner, "worker": self.worker},
            )
            row = await cur.fetchone()
        if row is None:
            log.warning("audio: call %s: lease lost before its download", call.call_id)
            return False
        call.attempt_id, call.attempt = row
        return True

    def fresh_temps(self, call_id: int) -> tuple[Path, Path]:
        """Drop what an earlier, dead attempt left; two new temporary files. (Blocking.)"""
        self.store.discard_temps(call_id)
        return self.store.temp_file(call_id, "original"), self.store.temp_file(call_id, "prepared")

    async def download(self, call: ClaimedCall, dest: Path) -> Downloaded:
        got = await download(
            self.http,
            call.url,
            dest,
            self.policy,
            max_bytes=self.s.audio_max_bytes,
            max_redirects=self.s.audio_max_redirects,
            timeout_sec=self.s.http_total_timeout_sec,
        )
        call.download_ms = int(got.elapsed_sec * 1000)
        call.bytes = got.size
        return got

    async def mark_ready(
        self,
        call: ClaimedCall,
        got: Downloaded,
        prepared: PreparedAudio,
        original: Path,
        flac: Path,
    ) -> str:
        """Record the call as ready, only while the lease is ours, and move its files to their
        final names while the row stays locked: a claim made after our lease ran out cannot
        interleave, and a failed move rolls the record back."""
        original_key, prepared_key = call_keys(
            call.call_id, call.playlist_uuid, call.started_at, prepared.extension
        )
        loop = asyncio.get_running_loop()
        async with db_connection() as conn:
            cur = await conn.execute(
                MARK_READY,
                {
                    "call_id": call.call_id,
                    "owner": self.owner,
                    "attempt_id": call.attempt_id,
                    "original_path": original_key,
                    "original_bytes": got.size,
                    "original_sha256": got.sha256,
                    "codec": prepared.codec,
                    "prepared_path": prepared_key,
                    "prepared_bytes": prepared.flac_bytes,
                    "prepared_sha256": prepared.flac_sha256,
                    "duration": prepared.duration_sec,
                    "bytes": call.bytes,
                    "download_ms": call.download_ms,
                    "prepare_ms": call.prepare_ms,
                },
            )
            row = await cur.fetchone()
            if not (row and row[0]):
                log.warning("audio: call %s: lease lost before it was stored", call.call_id)
                return "lease_lost"
            await loop.run_in_executor(
                None, self.store.promote, [(original, original_key), (flac, prepared_key)]
            )
        return "ready"

    async def mark_failed(self, call: ClaimedCall, failure: AudioFailure) -> str:
        async with db_connection() as conn:
            cur = await conn.execute(HOLD_LEASE, {"call_id": call.call_id, "owner": self.owner})
            row = await cur.fetchone()
            if row is None:
                await self.end_attempt(conn, call, "lease_lost", failure.code, failure.detail)
                return "lease_lost"
            attempts = row[0]
            final = not failure.retry or attempts >= self.s.audio_max_attempts
            delay = 0.0 if final else backoff_sec(self.s, attempts, failure.retry_after)
            await conn.execute(
                MARK_FAILED,
                {
                    "call_id": call.call_id,
                    "state": "failed" if final else "pending",
                    "delay": delay,
                    "code": failure.code,
                    "error": failure.detail[:2000],
                },
            )
            await self.end_attempt(
                conn, call, "failed" if final else "retry", failure.code, failure.detail
            )
        if final:
            log.warning(
                "audio: call %s failed after %d attempts: %s", call.call_id, attempts, failure
            )
            return "failed"
        log.info(
            "audio: call %s attempt %d: %s; next in %.0fs", call.call_id, attempts, failure, delay
        )
        return "retry"

    async def end_attempt(
        self,
        conn: psycopg.AsyncConnection[Any],
        call: ClaimedCall,
        outcome: str,
        code: str | None,
        error: str | None,
    ) -> None:
        await conn.execute(
            END_ATTEMPT,
            {
                "attempt_id": call.attempt_id,
                "outcome": outcome,
                "code": code,
                "error": error[:2000] if error else None,
                "bytes": call.bytes,
                "download_ms": call.download_ms,
                "prepare_ms": call.prepare_ms,
            },
        )


@app.task(
    name=PREPARE_TASK,
    bind=True,
    ignore_result=True,
    # Acked when done: a worker lost mid-task has the message delivered again, and the calls
    # still leased to this claim are then prepared by the next process (others are skipped).
    acks_late=True,
    # The asyncio deadline at the soft limit cancels the calls (their leases then run out and
    # they are claimed again).
    **backstop_time_limits(settings.job_soft_time_limit_sec, settings.job_time_limit_sec),
)
def prepare_calls(self: Task, call_ids: list[int], owner: str, more: bool = False) -> dict:
    """Prepare a few claimed calls at once; then hand ready ones to transcription."""
    if more:
        app.send_task(CLAIM_JOB)
    rt = Runtime.current()
    worker = process_id(self)
    preparer = CallPreparer(rt.settings, rt.http, owner, worker)
    outcome = rt.run(asyncio.wait_for(preparer.run(call_ids), rt.settings.job_soft_time_limit_sec))
    if outcome.ready:
        app.send_task(TRANSCRIPTION_DISPATCH)
    if rt.redis.delete(CLAIM_WANTED_KEY):
        app.send_task(CLAIM_JOB)  # a pass found no room; this task has just made some
    log.info(
        "audio: %d calls: %d ready, %d to retry, %d failed, %d lease lost, %d skipped%s",
        len(call_ids),
        outcome.ready,
        outcome.retry,
        outcome.failed,
        outcome.lease_lost,
        outcome.skipped,
        f", {outcome.unrecorded} not recorded" if outcome.unrecorded else "",
    )
    return outcome.__dict__
