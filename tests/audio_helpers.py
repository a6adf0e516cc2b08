"""Helpers for the audio tests and bench: calls from the feed simulator stored as ingest stores
them, call_audio rows, and audio answered with a network-like delay; for the worker tests, their
environment, claims, and checks of what was stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import psycopg

from workers.audio.store import FilesystemAudioStore
from workers.dev.simulator import AudioFault, FeedSimulator
from workers.dev.simulator.audio import load_clips

if TYPE_CHECKING:
    from tests.conftest import Services
    from workers.core.settings import Settings

CLIPS, SILENCE = load_clips()


def make_flac(
    path: Path,
    seconds: float,
    *,
    rate: int = 8000,
    amplitude: int = 0,
    declared_samples: int | None = None,
) -> Path:
    """A FLAC file of `seconds` of silence (amplitude 0) or of a 440 Hz tone, written a second
    at a time (so a long one costs no memory here). With declared_samples, its STREAMINFO header
    claims that many samples instead: a container that lies about its duration."""
    total = round(seconds * rate)
    tone = (amplitude * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.int16)
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        for start in range(0, total, rate):
            chunk = np.ascontiguousarray(tone[: min(rate, total - start)]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    if declared_samples is not None:
        data = bytearray(path.read_bytes())
        # "fLaC", a 4-byte block header, then STREAMINFO; total samples are its 36 bits after
        # bit 108 (block and frame sizes 80 bits, rate 20, channels 3, bits per sample 5).
        info = 8
        head = int.from_bytes(data[info + 13 : info + 18], "big")
        head = (head & ~((1 << 36) - 1)) | declared_samples
        data[info + 13 : info + 18] = head.to_bytes(5, "big")
        path.write_bytes(bytes(data))
    return path


def make_wav(path: Path, seconds: float, *, rate: int, layout: str = "mono") -> Path:
    """A WAV file of a tone at any sample rate and channel layout (e.g. "hexadecagonal")."""
    count = round(seconds * rate)
    channels = av.AudioLayout(layout).nb_channels
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(count) / rate)).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        packed = np.ascontiguousarray(np.repeat(tone, channels).reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(packed, format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def insert_call(
    conn: psycopg.Connection,
    url: str,
    duration: float | None,
    *,
    playlist: Any = None,
    started_at: datetime | None = None,
    size: int | None = None,
    group_id: str = "1-100",
    raw: dict | None = None,
) -> int:
    """Store one call in bcfy_calls_raw (its call_audio row comes from the trigger)."""
    started_at = started_at or datetime.now(UTC)
    ts = int(started_at.timestamp())
    row = conn.execute(
        "INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at, duration_sec,"
        " url, size_bytes, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            playlist,
            group_id,
            ts,
            started_at,
            duration,
            url,
            size,
            json.dumps(raw or {"url": url, "ts": ts, "duration": duration}),
        ),
    ).fetchone()
    assert row is not None
    return row[0]


def store_record(conn: psycopg.Connection, record: dict, playlist: Any) -> int:
    """A call record as the simulator serves it, stored the way ingest stores it."""
    return insert_call(
        conn,
        record["url"],
        record.get("duration"),
        playlist=playlist,
        started_at=datetime.fromtimestamp(record["start_ts"], UTC),
        size=record.get("size"),
        group_id=record["groupId"],
        raw=record,
    )


def publish(
    sim: FeedSimulator,
    conn: psycopg.Connection,
    playlist: str,
    audio: AudioFault = AudioFault.OK,
    **fields: Any,
) -> tuple[int, dict]:
    """Publish a call on the simulator and store it: (call id, record)."""
    record = sim.publish_call(playlist, audio=audio, **fields)
    return store_record(conn, record, playlist), record


def slow_audio(sim: FeedSimulator, latency: float) -> None:
    """Answer every audio request `latency` seconds late, as a distant server would (the
    simulator's own latency switch covers the API only)."""
    answer = sim.handle_audio

    def delayed(path: str) -> Any:
        time.sleep(latency)
        return answer(path)

    sim.handle_audio = delayed  # type: ignore[method-assign]


class HeldAudio:
    """Requests for one call's audio, each held until the test releases it (only the first
    `times`, if given): the test can act (kill the process downloading it) while a worker is
    mid-call. Other calls are answered as usual."""

    def __init__(
        self, sim: FeedSimulator, url: str, *, times: int | None = None, most_sec: float = 300.0
    ) -> None:
        self.path = url.split(sim.audio_host, 1)[1]
        self.arrived = 0  # requests for it so far, held or not
        self._released = 0
        self._cond = threading.Condition()
        answer = sim.handle_audio

        def held(path: str) -> Any:
            if path == self.path:
                with self._cond:
                    self.arrived += 1
                    mine = self.arrived
                    self._cond.notify_all()
                    if times is None or mine <= times:
                        self._cond.wait_for(lambda: self._released >= mine, most_sec)
            return answer(path)

        sim.handle_audio = held  # type: ignore[method-assign]

    def release_all(self) -> None:
        with self._cond:
            self._released = self.arrived
            self._cond.notify_all()


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
    assert store.temp_files() == [], "no temporary file left behind"
    return len(ready)


async def claim(services: Services, s: Settings, owner: str, *, hold: float = 0.0):
    """Claim a batch as the audio job does, in a transaction held open `hold` seconds."""
    from tasks.audio.claims import claim_pending_calls

    async with await psycopg.AsyncConnection.connect(services.database_url) as conn:
        got = await claim_pending_calls(conn, s, owner)
        await asyncio.sleep(hold)  # keep the transaction (and its row locks) open
        await conn.commit()
    return got
