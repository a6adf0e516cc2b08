"""Helpers for the audio tests: call_audio rows, the audio workers' environment, claims, and
checks of what was stored. Calls and audio files themselves are made by workers.dev.calls (the
audio bench makes them too)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from tests.support.procs import start_beat, start_worker
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.dev.calls import publish
from workers.dev.simulator import FeedSimulator

if TYPE_CHECKING:
    from tests.conftest import Services
    from workers.core.settings import Settings
    from workers.dev.procs import Proc


def audio_rows(conn: psycopg.Connection) -> dict[int, dict]:
    cur = conn.execute("SELECT * FROM call_audio ORDER BY call_id")
    names = [d.name for d in cur.description or []]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def truncate_calls(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE bcfy_calls_raw CASCADE")  # call_audio and what refers to calls


# --- the audio workers -----------------------------------------------------------------------


def make_env(services: Services, tmp_path: Path, sim: FeedSimulator, **extra: str) -> dict:
    """The environment of an audio worker or beat: the store under tmp_path, the simulator's
    audio host allowed, short locks, and `extra`."""
    env = services.worker_env(
        tmp_path,
        AUDIO_STORE_DIR=str(tmp_path / "store"),
        AUDIO_ALLOWED_HOSTS=sim.audio_host,
        AUDIO_ALLOWED_INTERNAL_NETWORKS="127.0.0.1/32",
        LOCK_TTL_SEC="5",
        LOCK_RENEW_SEC="1",
    )
    return env | extra


def lease_env(
    services: Services,
    tmp_path: Path,
    sim: FeedSimulator,
    *,
    batch: int,
    downloads: int,
    lease: float,
    **extra: str,
) -> dict:
    """make_env for a test in which leases run out: one claim of `batch` calls, `downloads` of
    them at once, leases of `lease` seconds, and the claim pass every second (with beat)."""
    return make_env(
        services,
        tmp_path,
        sim,
        AUDIO_WORKER_BATCH_SIZE=str(batch),
        AUDIO_DOWNLOAD_CONCURRENCY=str(downloads),
        AUDIO_LEASE_SEC=str(lease),
        AUDIO_WORKER_INTERVAL_SEC="1",
        **extra,
    )


def start_audio(
    procs: list[Proc],
    env: dict,
    tmp_path: Path,
    name: str = "a1",
    *,
    concurrency: int = 2,
    beat: bool = False,
) -> Proc:
    """An audio worker, and beat on production's schedule when `beat`; stopped with `procs`."""
    worker = start_worker(name, env, tmp_path, queues="audio", concurrency=concurrency)
    procs.append(worker)
    if beat:
        procs.append(start_beat("beat", env, tmp_path, app="workers.app"))
    return worker


def add_calls(db: psycopg.Connection, sim: FeedSimulator, n: int) -> dict[int, dict]:
    """Publish `n` calls on a new playlist and store them: {call id: record}."""
    playlist = sim.add_playlist()
    return dict(publish(sim, db, playlist) for _ in range(n))


def states(db: psycopg.Connection) -> dict[str, int]:
    rows = db.execute("SELECT state, count(*) FROM call_audio GROUP BY 1").fetchall()
    return dict(rows)


def attempts(db: psycopg.Connection) -> list[tuple]:
    """Rows of (call_id, lease_owner, worker, outcome) of call_audio_attempts, in order."""
    return db.execute(
        "SELECT call_id, lease_owner, worker, outcome FROM call_audio_attempts ORDER BY id"
    ).fetchall()


def attempt_rows(db: psycopg.Connection, call_id: int) -> list[tuple]:
    """Rows of (attempt, outcome, error_code) of one call's attempts, in order."""
    return db.execute(
        "SELECT attempt, outcome, error_code FROM call_audio_attempts WHERE call_id = %s"
        " ORDER BY id",
        (call_id,),
    ).fetchall()


def files_in(directory: Path) -> list[Path]:
    """Every file under a directory (a work directory's leftovers)."""
    return [p for p in directory.rglob("*") if p.is_file()]


def assert_stored_files_match(db: psycopg.Connection, store_dir: Path) -> int:
    """Every ready call's original and prepared files match their recorded size and sha256, and
    no temporary file is left in the store; returns how many calls are ready."""
    store = FilesystemAudioStore(store_dir)
    ready = [r for r in audio_rows(db).values() if r["state"] == "ready"]
    for row in ready:
        for kind in ("original", "prepared"):
            data = store.local_path(row[f"{kind}_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row[f"{kind}_sha256"], row["call_id"]
            assert len(data) == row[f"{kind}_bytes"]
    assert store.work.temp_files() == [], "no temporary file left behind"
    return len(ready)


async def claim(services: Services, s: Settings, owner: str, *, hold: float = 0.0):
    """Claim a batch as the audio job does, in a transaction held open `hold` seconds."""
    from tasks.audio.claims import claim_pending_calls

    async with await psycopg.AsyncConnection.connect(services.database_url) as conn:
        got = await claim_pending_calls(conn, s, owner)
        await asyncio.sleep(hold)  # keep the transaction (and its row locks) open
        await conn.commit()
    return got
