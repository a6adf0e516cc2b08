"""Preparing one claimed call: download, validate and convert, store, record the outcome.

A task's CallPreparer takes over its claim's calls (claims.HeldClaim), then works them on the
process's event loop: up to AUDIO_DOWNLOAD_CONCURRENCY downloads at once, each call validated
and converted in an executor as soon as it has arrived (while the next ones download), its files
moved into the store and the call marked ready, or failed (retried with backoff until
AUDIO_MAX_ATTEMPTS, or at once for a policy refusal). Each attempt is logged as its download
starts, naming the process, so that a death is counted against the right call; an outcome is
written only while the claim still holds the lease (checked under a row lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
from psycopg.rows import TupleRow

from tasks.audio.claims import MARK_FAILED, ClaimedCall, HeldClaim, TakeOver
from workers.audio.download import AudioFailure, Downloaded, UrlPolicy, download
from workers.audio.prepare import ORIGINAL_EXTENSIONS, PreparedAudio, validate_and_convert
from workers.audio.store import AudioStore, call_keys, store_for
from workers.core.backoff import backoff_sec
from workers.core.runtime import db_connection
from workers.core.settings import Settings
from workers.core.text import error_text

log = logging.getLogger(__name__)


def stale_temp_age(settings: Settings) -> float:
    """A temporary file untouched this long has no live writer: downloads have a deadline and
    their writers renew leases far more often."""
    return 2 * max(settings.audio.lease_sec, settings.services.http_total_timeout_sec)


async def forget_calls(
    store: AudioStore, calls: Iterable[tuple[int, UUID | None, datetime]]
) -> None:
    """Calls that failed for good leave nothing in the store: an earlier attempt may have
    stored their files and then failed to commit, or died between the two. The keys are known
    up to the original's extension, so every possible one is named (a missing key is fine)."""
    owners = {
        key: call_id
        for call_id, playlist_uuid, started_at in calls
        for extension in ORIGINAL_EXTENSIONS
        for key in call_keys(call_id, playlist_uuid, started_at, extension)
    }
    if not owners:
        return
    keys = sorted(owners)
    try:
        await store.delete(keys)
    except Exception as exc:
        # The store is down or refuses: the keys go to retention's trash list, whose run
        # removes them later (keys a call_audio row names again are kept).
        log.warning(
            "audio: could not remove the stored files of failed calls now (%s); "
            "the next maintenance run removes them",
            exc,
        )
        async with db_connection() as conn:
            await conn.execute(
                "INSERT INTO audio_file_trash (key, call_id)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[]) ON CONFLICT (key) DO NOTHING",
                (keys, [owners[k] for k in keys]),
            )


async def forget_call_ids(store: AudioStore, call_ids: list[int]) -> None:
    """forget_calls, for calls known by id (failed as worker_lost)."""
    if not call_ids:
        return
    async with db_connection() as conn:
        cur = await conn.execute(
            "SELECT id, playlist_uuid, started_at FROM bcfy_calls_raw WHERE id = ANY(%s)",
            (call_ids,),
        )
        rows = await cur.fetchall()
    await forget_calls(store, rows)


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

END_ATTEMPT = """
UPDATE call_audio_attempts
   SET ended_at = now(), outcome = %(outcome)s, error_code = %(code)s, error = %(error)s,
       bytes = %(bytes)s, download_ms = %(download_ms)s, prepare_ms = %(prepare_ms)s
 WHERE id = %(attempt_id)s
"""


class AudioOutcome(StrEnum):
    """What became of one call in a task; the first four are also the `outcome` its attempt
    logs in call_audio_attempts (with `worker_lost`, written by the claim's SQL)."""

    READY = "ready"
    RETRY = "retry"  # failed, back to pending after its backoff
    FAILED = "failed"  # for good
    LEASE_LOST = "lease_lost"  # another claim has it now: nothing written
    SKIPPED = "skipped"  # not ours any more (ready already, or claimed again) when the task began
    UNRECORDED = "unrecorded"  # the outcome could not be written (database down): lease runs out


@dataclass
class ChunkOutcome:
    """How many of a task's calls ended in each AudioOutcome."""

    ready: int = 0
    retry: int = 0
    failed: int = 0
    lease_lost: int = 0
    skipped: int = 0
    unrecorded: int = 0

    @classmethod
    def count(cls, outcomes: Iterable[AudioOutcome]) -> ChunkOutcome:
        n = Counter(outcomes)
        return cls(
            ready=n[AudioOutcome.READY],
            retry=n[AudioOutcome.RETRY],
            failed=n[AudioOutcome.FAILED],
            lease_lost=n[AudioOutcome.LEASE_LOST],
            skipped=n[AudioOutcome.SKIPPED],
            unrecorded=n[AudioOutcome.UNRECORDED],
        )


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

    def __init__(
        self, settings: Settings, http: httpx.AsyncClient, owner: str, worker: str
    ) -> None:
        self.s = settings
        self.http = http
        self.owner = owner
        self.claim = HeldClaim(settings, owner)
        self.worker = worker
        self.store = store_for(settings)
        self.policy = UrlPolicy(
            tuple(settings.audio.allowed_hosts), tuple(settings.audio.allowed_internal_networks)
        )
        self.slots = asyncio.Semaphore(settings.audio.download_concurrency)
        self.in_progress: set[int] = set()

    async def run(self, call_ids: list[int]) -> ChunkOutcome:
        taken = await self.take_over(call_ids)
        calls = taken.calls
        before = [AudioOutcome.FAILED] * taken.lost  # failed as worker_lost
        before += [AudioOutcome.SKIPPED] * (len(call_ids) - len(calls) - taken.lost)
        if not calls:
            return ChunkOutcome.count(before)
        self.in_progress = {c.call_id for c in calls}
        renewer = asyncio.create_task(self.claim.renew_leases(self.in_progress))
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
        return ChunkOutcome.count([*before, *results])

    async def take_over(self, call_ids: list[int]) -> TakeOver:
        """Take over the calls still leased to this claim (HeldClaim.take_over says how), and
        discard what a dead process was writing for those that failed as worker_lost."""
        taken = await self.claim.take_over(call_ids)
        loop = asyncio.get_running_loop()
        for call_id in taken.lost_calls:  # what the dead process was writing for it
            await loop.run_in_executor(None, self.store.work.discard_temps, call_id)
        await forget_call_ids(self.store, taken.lost_calls)
        return taken

    async def prepare(self, call: ClaimedCall) -> AudioOutcome:
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
            return AudioOutcome.UNRECORDED

    async def prepare_or_raise(self, call: ClaimedCall) -> AudioOutcome:
        loop = asyncio.get_running_loop()
        original = flac = None
        try:
            original, flac = await loop.run_in_executor(None, self.fresh_temps, call.call_id)
            async with self.slots:
                if not await self.start_attempt(call):
                    return AudioOutcome.LEASE_LOST
                got = await self.download(call, original)
            started = time.monotonic()
            prepared = await loop.run_in_executor(
                None,
                functools.partial(
                    validate_and_convert,
                    original,
                    flac,
                    expected_duration=call.duration_sec,
                    tolerance=self.s.audio.duration_tolerance,
                    silence_dbfs=self.s.audio.silence_dbfs,
                    max_duration_sec=self.s.audio.max_duration_sec,
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
            self.store.work.discard(original, flac)

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
        work = self.store.work
        work.discard_temps(call_id)
        return work.temp_file(call_id, "original"), work.temp_file(call_id, "prepared")

    async def download(self, call: ClaimedCall, dest: Path) -> Downloaded:
        got = await download(
            self.http,
            call.url,
            dest,
            self.policy,
            max_bytes=self.s.audio.max_bytes,
            max_redirects=self.s.audio.max_redirects,
            timeout_sec=self.s.services.http_total_timeout_sec,
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
    ) -> AudioOutcome:
        """Record the call as ready, only while the lease is ours, and move its files to their
        final names while the row stays locked: a claim made after our lease ran out cannot
        interleave, and a failed move rolls the record back."""
        original_key, prepared_key = call_keys(
            call.call_id, call.playlist_uuid, call.started_at, prepared.extension
        )
        async with db_connection() as conn:
            # The files are uploaded inside this transaction, the row locked (claims skip locked
            # rows): should this host stop or lose the network mid-upload, the server ends the
            # session and its lock once it has been idle this long, not when TCP notices (hours).
            # This host gives up first, at half that: the upload is cancelled and the row
            # rolled back, rather than an upload finishing after the server ended the session.
            locked_for = stale_temp_age(self.s)
            await conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                (str(int(1000 * locked_for)),),
            )
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
                return AudioOutcome.LEASE_LOST
            # Uploaded (or renamed) while the row is locked; should the commit then fail, the
            # call is tried again (same keys) or fails for good, and forget_call removes them.
            try:
                async with asyncio.timeout(locked_for / 2):
                    await self.store.promote([(original, original_key), (flac, prepared_key)])
            except TimeoutError:
                raise AudioFailure(
                    "store_timeout", f"storing the files took over {locked_for / 2:g}s"
                ) from None
        return AudioOutcome.READY

    async def mark_failed(self, call: ClaimedCall, failure: AudioFailure) -> AudioOutcome:
        async with db_connection() as conn:
            cur = await conn.execute(HOLD_LEASE, {"call_id": call.call_id, "owner": self.owner})
            row = await cur.fetchone()
            if row is None:
                await self.end_attempt(
                    conn, call, AudioOutcome.LEASE_LOST, failure.code, failure.detail
                )
                return AudioOutcome.LEASE_LOST
            attempts = row[0]
            final = not failure.retry or attempts >= self.s.audio.max_attempts
            delay = 0.0
            if not final:
                s = self.s
                delay = backoff_sec(
                    attempts, s.audio.retry_base_sec, s.audio.retry_max_sec, failure.retry_after
                )
            await conn.execute(
                MARK_FAILED,
                {
                    "call_id": call.call_id,
                    "state": "failed" if final else "pending",
                    "delay": delay,
                    "code": failure.code,
                    "error": error_text(failure.detail),
                },
            )
            await self.end_attempt(
                conn,
                call,
                AudioOutcome.FAILED if final else AudioOutcome.RETRY,
                failure.code,
                failure.detail,
            )
        if final:
            log.warning(
                "audio: call %s failed after %d attempts: %s", call.call_id, attempts, failure
            )
            await self.forget_call(call)
            return AudioOutcome.FAILED
        log.info(
            "audio: call %s attempt %d: %s; next in %.0fs", call.call_id, attempts, failure, delay
        )
        return AudioOutcome.RETRY

    async def forget_call(self, call: ClaimedCall) -> None:
        await forget_calls(self.store, [(call.call_id, call.playlist_uuid, call.started_at)])

    async def end_attempt(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        call: ClaimedCall,
        outcome: AudioOutcome,
        code: str | None,
        error: str | None,
    ) -> None:
        await conn.execute(
            END_ATTEMPT,
            {
                "attempt_id": call.attempt_id,
                "outcome": outcome,
                "code": code,
                "error": error_text(error) if error else None,
                "bytes": call.bytes,
                "download_ms": call.download_ms,
                "prepare_ms": call.prepare_ms,
            },
        )
