"""One claimed batch prepared in-process, end to end, against real PostgreSQL and the feed
simulator: good calls become ready with files that match their checksums, each bad one fails
with its reason without stopping the others, and no temporary file is left."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import pytest

from tasks.audio import CallPreparer
from tests.audio_helpers import assert_stored_files_match, audio_rows, claim, insert_call, publish
from tests.conftest import Services
from workers.audio_codec import probe
from workers.audio_store import FilesystemAudioStore
from workers.runtime import Runtime
from workers.settings import Settings, get_settings
from workers.simulator import AudioFault, FeedSimulator


def settings_for(sim: FeedSimulator, tmp_path, **overrides) -> Settings:
    return dataclasses.replace(
        get_settings(),
        audio_store_dir=str(tmp_path / "store"),
        audio_allowed_hosts=(sim.audio_host,),
        audio_allowed_internal_networks=("127.0.0.1/32",),
        **overrides,
    )


def run_batch(services: Services, s: Settings, owner: str = "test-claim"):
    claimed = asyncio.run(claim(services, s, owner))
    rt = Runtime.current()
    return rt.run(CallPreparer(s, rt.http, owner, "test:1").run(claimed.call_ids))


def test_a_mixed_batch_ends_with_each_call_ready_or_failed_with_its_reason(
    db, clean, sim, tmp_path
):
    s = settings_for(sim, tmp_path, audio_max_attempts=1, audio_worker_batch_size=20)
    playlist = sim.add_playlist()
    good = dict(publish(sim, db, playlist) for _ in range(4))
    good |= dict([publish(sim, db, playlist, AudioFault.REDIRECT_OK)])
    bad = {
        publish(sim, db, playlist, AudioFault.MISSING)[0]: ("http_404", "answered 404"),
        publish(sim, db, playlist, AudioFault.WRONG_TYPE)[0]: (
            "not_audio",
            "Content-Type text/html",
        ),
        publish(sim, db, playlist, AudioFault.TRUNCATED)[0]: (
            "truncated",
            "bytes the service announced (undecodable",
        ),
        publish(sim, db, playlist, AudioFault.OVERSIZE)[0]: ("too_large", "Content-Length"),
        publish(sim, db, playlist, AudioFault.OVERSIZE_UNDECLARED)[0]: (
            "too_large",
            "exceeds 25000000 bytes (no Content-Length)",
        ),
        publish(sim, db, playlist, AudioFault.SILENCE)[0]: ("silence", "silent from end to end"),
        publish(sim, db, playlist, AudioFault.REDIRECT_INTERNAL)[0]: (
            "internal_address",
            "169.254.169.254 is a link-local address",
        ),
        publish(sim, db, playlist, duration=9.0)[0]: ("duration_mismatch", "the API says 9.00s"),
        insert_call(db, "https://example.com/call.m4a", 4.0): (
            "disallowed_host",
            "example.com is not in AUDIO_ALLOWED_HOSTS",
        ),
    }
    outcome = run_batch(clean, s)
    assert (outcome.ready, outcome.failed) == (len(good), len(bad))

    rows = audio_rows(db)
    store = FilesystemAudioStore(s.audio_store_dir)
    for call_id, record in good.items():
        row = rows[call_id]
        assert row["state"] == "ready" and row["attempts"] == 1 and row["last_error"] is None
        day = datetime.fromtimestamp(record["start_ts"], UTC).strftime("%Y-%m-%d")
        assert row["original_path"] == f"{playlist}/{day}/{call_id}.m4a"
        assert row["prepared_path"] == f"{playlist}/{day}/{call_id}.16k.flac"
        assert row["original_bytes"] == record["size"]
        info = probe(store.local_path(row["prepared_path"]))
        assert (info.codec, info.sample_rate, info.channels) == ("flac", 16000, 1)
        assert info.duration_sec == pytest.approx(record["duration"], abs=0.1)
        assert row["measured_duration_sec"] == pytest.approx(record["duration"], abs=0.1)
        assert row["original_codec"] == "aac"
    for call_id, (code, text) in bad.items():
        row = rows[call_id]
        assert (row["state"], row["error_code"]) == ("failed", code), row["last_error"]
        assert text in row["last_error"], row["last_error"]
        assert row["prepared_path"] is None
    # Exactly the good calls are ready, their files as recorded, no temporary file left.
    assert assert_stored_files_match(db, tmp_path / "store") == len(good)
    attempts = db.execute(
        "SELECT outcome, count(*) FROM call_audio_attempts GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert attempts == [("failed", len(bad)), ("ready", len(good))]


def test_a_retryable_failure_goes_back_to_pending_with_backoff(db, clean, sim, tmp_path):
    s = settings_for(sim, tmp_path, audio_retry_base_sec=60)
    call, _ = publish(sim, db, sim.add_playlist(), AudioFault.MISSING)
    assert run_batch(clean, s).retry == 1
    row = audio_rows(db)[call]
    assert (row["state"], row["attempts"], row["error_code"]) == ("pending", 1, "http_404")
    assert row["lease_until"] is None
    assert 55 < (row["next_attempt_at"] - row["updated_at"]).total_seconds() < 65


def test_a_call_already_ready_is_not_prepared_again(db, clean, sim, tmp_path):
    s = settings_for(sim, tmp_path)
    call, _ = publish(sim, db, sim.add_playlist())
    assert run_batch(clean, s, owner="first").ready == 1
    served = sim.requests["audio"]
    rt = Runtime.current()
    again = rt.run(CallPreparer(s, rt.http, "first", "test:2").run([call]))
    assert (again.ready, again.skipped) == (0, 1)
    assert sim.requests["audio"] == served, "nothing downloaded twice"
