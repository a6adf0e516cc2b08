"""Helpers for the audio tests and bench: calls from the feed simulator stored as ingest stores
them, call_audio rows, and audio answered with a network-like delay."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from workers.simulator import AudioFault, FeedSimulator
from workers.simulator.audio import load_clips

CLIPS, SILENCE = load_clips()


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


def audio_rows(conn: psycopg.Connection) -> dict[int, dict]:
    cur = conn.execute("SELECT * FROM call_audio ORDER BY call_id")
    names = [d.name for d in cur.description or []]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def truncate_calls(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE bcfy_calls_raw CASCADE")  # call_audio and what refers to calls
