"""Calls and audio for the tests and benches: calls from the feed simulator stored as ingest
stores them, audio files made to measure (a tone or silence, a container that lies about its
duration), and the simulator's audio answered late or held."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import av
import numpy as np
import psycopg

from workers.core.rows import one_row
from workers.dev.simulator import AudioFault, FeedSimulator
from workers.dev.simulator.audio import load_clips

if TYPE_CHECKING:
    from workers.dev.simulator.server import _Answer

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
    playlist: str | UUID | None = None,
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
    return int(one_row(row)[0])


def store_record(conn: psycopg.Connection, record: dict, playlist: str | UUID | None) -> int:
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

    def delayed(path: str) -> _Answer:
        time.sleep(latency)
        return answer(path)

    sim.handle_audio = delayed  # type: ignore[method-assign]  # this instance's route, wrapped


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

        def held(path: str) -> _Answer:
            if path == self.path:
                with self._cond:
                    self.arrived += 1
                    mine = self.arrived
                    self._cond.notify_all()
                    if times is None or mine <= times:
                        self._cond.wait_for(lambda: self._released >= mine, most_sec)
            return answer(path)

        sim.handle_audio = held  # type: ignore[method-assign]  # this instance's route, wrapped

    def release_all(self) -> None:
        with self._cond:
            self._released = self.arrived
            self._cond.notify_all()
