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
from tests.support.speech import normalised_words, words_found
from tests.transcription.fake_openai import FakeTranscriptionService, fake_service
from workers.audio.codec import convert_for_recognizers
from workers.core.rows import one_row
from workers.core.runtime import Runtime
from workers.core.settings import load_settings, reset_settings_cache
from workers.dev.simulator.make_clips import CLIPS_DIR
from workers.recognizers import Recognizer

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


def flac(prepared_clips: Path, clip: str) -> Path:
    """A clip as the audio stage prepares it (16 kHz mono FLAC)."""
    return prepared_clips / "prepared" / f"{Path(clip).stem}.flac"


def recognise_spoken_calls(recognizer: Recognizer, prepared_clips: Path, model: str) -> float:
    """Every spoken test call through the recogniser, each result checked as a transcript must
    be (duration, language, model name starting with `model`, confidence, segments that make
    the text, inside the call, each with its words in order inside it); returns the share of
    the words said that were recognised (normalised: "12" is "twelve")."""
    found = total = 0
    for clip, text in CLIP_TEXT.items():
        result = recognizer.transcribe(flac(prepared_clips, clip), name=clip)
        hit, said = words_found(text, result.text)
        found, total = found + hit, total + said
        duration = next(c["duration"] for c in CLIPS["clips"] if c["file"] == clip)
        assert result.audio_duration_sec == pytest.approx(duration, abs=0.1)
        assert result.language == "en" and result.model.startswith(model), result.model
        assert result.confidence is not None and 0 <= result.confidence <= 1
        assert result.segments and result.empty_reason is None, f"{clip}: {result}"
        assert " ".join(s.text for s in result.segments) == result.text
        for seg in result.segments:
            assert 0 <= seg.start < seg.end <= duration + 0.05
            assert seg.words, f"{clip}: a segment without word times"
            joined = " ".join(w.text for w in seg.words)
            assert normalised_words(joined) == normalised_words(seg.text)
            for word in seg.words:
                assert seg.start - 0.05 <= word.start <= word.end <= seg.end + 0.05
                assert word.confidence is not None and 0 <= word.confidence <= 1
            starts = [w.start for w in seg.words]
            assert starts == sorted(starts)
    print(
        f"\n{model} recognised {found} of {total} words of the spoken calls ({found / total:.0%})"
    )
    return found / total


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
