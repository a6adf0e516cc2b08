"""One claimed batch prepared in-process, end to end, against real PostgreSQL and a local HTTP
server: good calls become ready with files that match their checksums, each bad one fails with
its reason without stopping the others, and no temporary file is left."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from tasks.audio import CallPreparer, claim_pending_calls
from tests.audio_helpers import CLIPS, ClipServer, audio_rows, clip_server, insert_call
from tests.audio_helpers import truncate_calls as truncate
from tests.conftest import Services
from workers.audio_codec import probe
from workers.audio_store import FilesystemAudioStore
from workers.runtime import Runtime
from workers.settings import get_settings


@pytest.fixture
def db(clean: Services) -> Iterator[psycopg.Connection]:
    with clean.db() as conn:
        truncate(conn)
        yield conn
    Runtime.shutdown_current()


@pytest.fixture
def server() -> Iterator[ClipServer]:
    yield from clip_server()


def run_batch(services: Services, s, owner: str = "test-claim"):
    async def claim():
        async with await psycopg.AsyncConnection.connect(services.database_url) as conn:
            return await claim_pending_calls(conn, s, owner)

    claimed = asyncio.run(claim())
    rt = Runtime.current()
    return rt.run(CallPreparer(s, rt.http, owner, "test:1").run(claimed.call_ids))


def test_a_mixed_batch_ends_with_each_call_ready_or_failed_with_its_reason(
    db, clean, server, tmp_path
):
    s = dataclasses.replace(
        get_settings(),
        audio_store_dir=str(tmp_path / "store"),
        audio_allowed_hosts=(server.host,),
        audio_allowed_internal_networks=("127.0.0.1/32",),
        audio_max_attempts=1,
        audio_max_bytes=2_000_000,
    )
    playlist = uuid.uuid4()
    day = datetime(2026, 3, 4, 23, 59, tzinfo=UTC)
    good = {
        insert_call(
            db, server.url(f"clip/{c['file']}"), c["duration"], playlist=playlist, started_at=day
        ): c
        for c in CLIPS[:4]
    }
    d = CLIPS[0]["duration"]
    bad = {
        insert_call(db, server.url("missing.m4a"), d): ("http_404", "answered 404"),
        insert_call(db, server.url("html"), d): ("not_audio", "Content-Type text/html"),
        insert_call(db, server.url("clip/call01.m4a?truncate=1"), d): ("truncated", ""),
        insert_call(db, server.url("oversize"), d): ("too_large", "exceeds 2000000 bytes"),
        insert_call(db, server.url("clip/silence.m4a"), 3.0): ("silence", "silent from end"),
        insert_call(db, server.url("clip/call01.m4a"), 9.0): ("duration_mismatch", "9.00s"),
        insert_call(db, "http://example.com/a.m4a", d): ("disallowed_host", "example.com"),
        insert_call(db, server.url("redirect?to=http://169.254.169.254/x"), d): (
            "internal_address",
            "169.254.169.254 is a link-local address",
        ),
    }
    outcome = run_batch(clean, dataclasses.replace(s, audio_worker_batch_size=20))
    assert (outcome.ready, outcome.failed) == (len(good), len(bad))

    rows = audio_rows(db)
    store = FilesystemAudioStore(s.audio_store_dir)
    for call_id, clip in good.items():
        row = rows[call_id]
        assert row["state"] == "ready" and row["attempts"] == 1 and row["last_error"] is None
        assert row["prepared_path"] == f"{playlist}/2026-03-04/{call_id}.16k.flac"
        assert row["original_path"] == f"{playlist}/2026-03-04/{call_id}.m4a"
        for kind in ("original", "prepared"):
            data = store.local_path(row[f"{kind}_path"]).read_bytes()
            assert len(data) == row[f"{kind}_bytes"]
            assert hashlib.sha256(data).hexdigest() == row[f"{kind}_sha256"]
        info = probe(store.local_path(row["prepared_path"]))
        assert (info.codec, info.sample_rate, info.channels) == ("flac", 16000, 1)
        assert info.duration_sec == pytest.approx(clip["duration"], abs=0.1)
        assert row["measured_duration_sec"] == pytest.approx(clip["duration"], abs=0.1)
    for call_id, (code, text) in bad.items():
        row = rows[call_id]
        assert (row["state"], row["error_code"]) == ("failed", code), row["last_error"]
        assert text in row["last_error"]
        assert row["prepared_path"] is None
    assert store.temp_files() == [], "no temporary file left behind"
    attempts = db.execute(
        "SELECT outcome, count(*) FROM call_audio_attempts GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert attempts == [("failed", len(bad)), ("ready", len(good))]


def test_a_retryable_failure_goes_back_to_pending_with_backoff(db, clean, server, tmp_path):
    s = dataclasses.replace(
        get_settings(),
        audio_store_dir=str(tmp_path / "store"),
        audio_allowed_hosts=(server.host,),
        audio_allowed_internal_networks=("127.0.0.1/32",),
        audio_retry_base_sec=60,
    )
    call = insert_call(db, server.url("missing.m4a"), 4.0)
    assert run_batch(clean, s).retry == 1
    row = audio_rows(db)[call]
    assert (row["state"], row["attempts"], row["error_code"]) == ("pending", 1, "http_404")
    assert row["lease_until"] is None
    assert 55 < (row["next_attempt_at"] - row["updated_at"]).total_seconds() < 65
