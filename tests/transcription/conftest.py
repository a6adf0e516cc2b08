"""Ready calls for the transcription tests, made the way the pipeline makes them.

A call is a bcfy_calls_raw row (the audio trigger gives it its call_audio row); it becomes
ready when call_audio says so and points at a 16 kHz mono FLAC converted from one of the
spoken test clips with audio_codec, the one conversion the audio stage uses.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.conftest import Services
from tests.transcription.fake_openai import FakeTranscriptionService, fake_service
from workers.audio.codec import convert_for_recognizers
from workers.core.rows import one_row
from workers.core.runtime import Runtime
from workers.core.settings import load_settings, reset_settings_cache
from workers.dev.simulator.make_clips import CLIPS_DIR

CLIPS: dict[str, Any] = json.loads((CLIPS_DIR / "clips.json").read_text())
CLIP_TEXT = {c["file"]: c["text"] for c in CLIPS["clips"]}


@pytest.fixture(scope="session")
def prepared_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every clip (and the silence) converted once: <dir>/prepared/<name>.flac."""
    root = tmp_path_factory.mktemp("prepared-clips")
    (root / "prepared").mkdir()
    for name in [*CLIP_TEXT, CLIPS["silence"]["file"]]:
        convert_for_recognizers(CLIPS_DIR / name, root / "prepared" / f"{Path(name).stem}.flac")
    return root


@pytest.fixture
def audio_store(prepared_clips: Path, tmp_path: Path) -> Path:
    """This test's AUDIO_STORE_DIR, holding the prepared clips."""
    store = tmp_path / "audio"
    shutil.copytree(prepared_clips, store)
    return store


@dataclass
class Calls:
    services: Services
    store: Path

    def db(self) -> psycopg.Connection[TupleRow]:
        return self.services.db()

    def add(
        self,
        clip: str = "call01.m4a",
        *,
        ago: timedelta = timedelta(minutes=5),
        ready: bool = True,
        group_id: str = "7001-101",
        playlist: uuid.UUID | None = None,
        display: str | None = None,
    ) -> int:
        """A stored call, with its audio ready (unless ready=False). Returns its id."""
        started = datetime.now(UTC) - ago
        with self.db() as conn:
            (call_id,) = one_row(
                conn.execute(
                    """INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at,
                                                   duration_sec, url, display, raw)
                       VALUES (%s, %s, %s, %s, 5.0, %s, %s, '{}') RETURNING id""",
                    (
                        playlist,
                        group_id,
                        int(started.timestamp()),
                        started,
                        f"https://calls.example/{uuid.uuid4().hex}.m4a",
                        display,
                    ),
                ).fetchone()
            )
            if ready:
                self.make_ready(conn, call_id, f"prepared/{Path(clip).stem}.flac")
        return int(call_id)

    def make_ready(self, conn: psycopg.Connection[TupleRow], call_id: int, prepared: str) -> None:
        conn.execute(
            """UPDATE call_audio SET state = 'ready', prepared_path = %s, ready_at = now(),
                      original_path = %s, updated_at = now()
                WHERE call_id = %s""",
            (prepared, f"originals/{call_id}.m4a", call_id),
        )

    def update(self, call_id: int, assignments: str, *params: object) -> None:
        """`UPDATE call_transcription SET <assignments>` for one call, as a stage would."""
        with self.db() as conn:
            conn.execute(
                f"UPDATE call_transcription SET {assignments} WHERE call_id = %s",
                (*params, call_id),
            )

    def worker_env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        """A transcription worker's environment: these calls' store, short locks, and `extra`."""
        env = self.services.worker_env(
            tmp_path, AUDIO_STORE_DIR=str(self.store), LOCK_TTL_SEC="3", LOCK_RENEW_SEC="1"
        )
        env.update(extra)
        # Keep the worker's environment from this process's monkeypatched settings.
        for key in [k for k in os.environ if k.startswith("TRANSCRIBE_") and k not in env]:
            env[key] = ""
        return env

    def state(self, call_id: int) -> dict[str, Any]:
        with self.db() as conn:
            cur = conn.execute("SELECT * FROM call_transcription WHERE call_id = %s", (call_id,))
            row = cur.fetchone()
            assert row is not None, f"call {call_id} has no call_transcription row"
            return dict(zip([d.name for d in cur.description or []], row, strict=True))

    def transcripts(self, call_id: int | None = None) -> list[dict[str, Any]]:
        with self.db() as conn:
            cur = conn.execute(
                "SELECT * FROM transcripts WHERE %(id)s::bigint IS NULL OR call_id = %(id)s"
                " ORDER BY id",
                {"id": call_id},
            )
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


@pytest.fixture
def calls(clean: Services, audio_store: Path) -> Iterator[Calls]:
    """An empty pipeline (no calls, no playlists), and a way to add ready calls."""
    with clean.db() as conn:
        conn.execute("TRUNCATE bcfy_calls_raw, bcfy_playlists CASCADE")
    yield Calls(clean, audio_store)


@pytest.fixture
def use_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Settings for code run in this process: set variables, get fresh Settings and Runtime."""

    def apply(**env: str) -> Any:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        reset_settings_cache()
        Runtime.shutdown_current()
        return load_settings()

    yield apply
    Runtime.shutdown_current()
    reset_settings_cache()


@pytest.fixture
def service() -> Iterator[FakeTranscriptionService]:
    with fake_service() as s:
        yield s
