"""One claimed batch prepared in-process, end to end, against real PostgreSQL and the feed
simulator: good calls become ready with files that match their checksums, each bad one fails
with its reason without stopping the others, and no temporary file is left."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.audio.preparation import CallPreparer
from tests.conftest import Services
from tests.support.audio import assert_stored_files_match, audio_rows, claim
from workers.audio.codec import probe
from workers.audio.download import AudioFailure
from workers.audio.prepare import PreparedAudio, validate_and_convert
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.core.backoff import JITTER
from workers.core.runtime import Runtime
from workers.core.settings import Settings, get_settings
from workers.dev.calls import CLIPS, SILENCE, insert_call, make_flac, make_wav, publish
from workers.dev.procs import wait_until
from workers.dev.simulator import AudioFault, FeedSimulator
from workers.dev.simulator.server import _Answer


def settings_for(sim: FeedSimulator, tmp_path, **overrides) -> Settings:
    return get_settings().with_values(
        AUDIO_STORE_DIR=str(tmp_path / "store"),
        AUDIO_ALLOWED_HOSTS=(sim.audio_host,),
        AUDIO_ALLOWED_INTERNAL_NETWORKS=("127.0.0.1/32",),
        **overrides,
    )


def run_batch(services: Services, s: Settings, owner: str = "test-claim"):
    claimed = asyncio.run(claim(services, s, owner))
    rt = Runtime.current()
    return rt.run(CallPreparer(s, rt.http, owner, "test:1").run(claimed.call_ids))


def test_a_mixed_batch_ends_with_each_call_ready_or_failed_with_its_reason(
    db, clean, sim, tmp_path
):
    s = settings_for(sim, tmp_path, AUDIO_MAX_ATTEMPTS=1, AUDIO_WORKER_BATCH_SIZE=20)
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
    store = FilesystemAudioStore(s.audio.store_dir)
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
    s = settings_for(sim, tmp_path, AUDIO_RETRY_BASE_SEC=60)
    call, _ = publish(sim, db, sim.add_playlist(), AudioFault.MISSING)
    assert run_batch(clean, s).retry == 1
    row = audio_rows(db)[call]
    assert (row["state"], row["attempts"], row["error_code"]) == ("pending", 1, "http_404")
    assert row["lease_until"] is None
    # The one backoff: 60 s for the first retry, give or take its jitter (and rounding).
    wait = (row["next_attempt_at"] - row["updated_at"]).total_seconds()
    assert 60 * (1 - JITTER) - 0.1 <= wait <= 60 * (1 + JITTER) + 0.1, wait


def test_a_call_already_ready_is_not_prepared_again(db, clean, sim, tmp_path):
    s = settings_for(sim, tmp_path)
    call, _ = publish(sim, db, sim.add_playlist())
    assert run_batch(clean, s, owner="first").ready == 1
    served = sim.requests["audio"]
    rt = Runtime.current()
    again = rt.run(CallPreparer(s, rt.http, "first", "test:2").run([call]))
    assert (again.ready, again.skipped) == (0, 1)
    assert sim.requests["audio"] == served, "nothing downloaded twice"


# --- hostile audio: validate_and_convert alone ----------------------------------------------

LIMIT = 5.0  # AUDIO_MAX_DURATION_SEC for these tests: small, to keep them fast


def prepare(original: Path, out: Path, *, limit: float = LIMIT) -> PreparedAudio:
    """The audio stage's prepare step with no API duration (nothing else bounds it)."""
    return validate_and_convert(
        original,
        out,
        expected_duration=None,
        tolerance=0.15,
        silence_dbfs=-50,
        max_duration_sec=limit,
    )


def prepared_or_refused(original: Path, out: Path, *, limit: float = LIMIT) -> str:
    """Either a complete FLAC as described, or an AudioFailure with a reason and no file."""
    try:
        prepared = prepare(original, out, limit=limit)
    except AudioFailure as failure:
        assert failure.code and failure.detail, failure
        assert not out.exists(), f"{failure.code}: a partial output was left"
        return failure.code
    info = probe(out)
    assert (info.codec, info.sample_rate, info.channels) == ("flac", 16000, 1)
    assert 0 < prepared.duration_sec <= limit
    assert info.duration_sec == pytest.approx(prepared.duration_sec, abs=0.1)
    assert out.stat().st_size == prepared.flac_bytes
    return "ready"


def test_audio_longer_than_the_limit_fails_for_good_naming_the_limit(tmp_path):
    out = tmp_path / "out.flac"
    with pytest.raises(AudioFailure) as refused:
        prepare(make_flac(tmp_path / "long.flac", 2 * LIMIT, amplitude=8000), out)
    assert refused.value.code == "too_long" and not refused.value.retry
    assert "AUDIO_MAX_DURATION_SEC (5 s)" in refused.value.detail, refused.value.detail
    assert not out.exists()


def test_audio_just_under_the_limit_is_prepared(tmp_path):
    out = tmp_path / "out.flac"
    prepared = prepare(make_flac(tmp_path / "under.flac", LIMIT - 0.1, amplitude=8000), out)
    assert prepared.duration_sec == pytest.approx(LIMIT - 0.1, abs=0.01)
    assert probe(out).duration_sec == pytest.approx(LIMIT - 0.1, abs=0.01)


def test_a_container_that_understates_its_duration_is_still_refused(tmp_path):
    """The header says one second; the frames hold thirty: the decoded samples count."""
    lying = make_flac(tmp_path / "lying.flac", 30, amplitude=8000, declared_samples=8000)
    with pytest.raises(AudioFailure, match="too_long"):
        prepare(lying, tmp_path / "out.flac")


def test_a_tag_that_is_not_utf8_does_not_stop_a_call(tmp_path):
    """Found by the damaged-clip fuzz test: a byte like this in the MP4 brand used to raise
    UnicodeDecodeError out of the decoder's open, which no caller expected."""
    odd = tmp_path / "odd.m4a"
    odd.write_bytes(CLIPS[0].data.replace(b"ftypisom", b"ftyp\x80som", 1))
    assert prepared_or_refused(odd, tmp_path / "out.flac", limit=60.0) == "ready"


@pytest.mark.parametrize(
    ("rate", "layout", "reason"),
    [(384_000, "mono", "sample rate 384000 Hz"), (8000, "hexadecagonal", "16 channels")],
)
def test_a_layout_no_call_has_fails_for_good(tmp_path, rate, layout, reason):
    """Each such second costs many times a call's to decode: refused, not converted."""
    out = tmp_path / "out.flac"
    with pytest.raises(AudioFailure) as refused:
        prepare(make_wav(tmp_path / "odd.wav", 1.0, rate=rate, layout=layout), out)
    assert refused.value.code == "unsupported_audio" and not refused.value.retry
    assert reason in refused.value.detail
    assert not out.exists()


@pytest.mark.parametrize(
    ("amplitude", "limit", "outcome"),
    [(0, 60.0, "too_long"), (8000, 3600.0, "ready")],
    ids=["silence, 60 s limit", "tone, 1 h limit"],
)
def test_preparing_ten_minutes_holds_a_bounded_amount_of_memory(
    tmp_path, amplitude, limit, outcome
):
    """Samples stream from the decoder to the FLAC: memory does not grow with the duration.
    The whole decode of ten minutes at 16 kHz int16 is 19.2 MB; what remains is a few frames
    and the checksum's 1 MB reads."""
    original = make_flac(tmp_path / "long.flac", 600, amplitude=amplitude)
    out = tmp_path / "out.flac"
    whole_decode = 600 * 16000 * 2
    tracemalloc.start()
    try:
        try:
            prepare(original, out, limit=limit)
            result = "ready"
        except AudioFailure as failure:
            result = failure.code
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result == outcome
    assert out.exists() == (outcome == "ready")
    assert peak < whole_decode / 5, f"peak {peak} bytes; the whole decode is {whole_decode}"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_prepared_or_refused_with_a_reason(tmp_path, data):
    original = tmp_path / "in.bin"
    original.write_bytes(data)
    out = tmp_path / "out.flac"
    out.unlink(missing_ok=True)
    prepared_or_refused(original, out)


@dataclasses.dataclass(frozen=True)
class Damaged:
    """A real clip with some damage done; its repr says what, not the 20 KB it makes."""

    clip: str
    data: bytes = dataclasses.field(repr=False)
    damage: tuple[str, ...]


@st.composite
def damaged_clips(draw: st.DrawFn) -> Damaged:
    """A real served clip, cut short and/or with bytes overwritten, inserted or removed."""
    clip = draw(st.sampled_from([*CLIPS, SILENCE]))
    data = bytearray(clip.data)
    damage: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if kind == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = chunk
        else:
            del data[at : at + len(chunk)]
        damage.append(f"{kind} {chunk!r} at {at}")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
        damage.append(f"cut at {cut}")
    return Damaged(clip.file, bytes(data), tuple(damage))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damaged=damaged_clips())
def test_damaged_clips_are_prepared_or_refused_with_a_reason(tmp_path, damaged):
    original = tmp_path / "in.m4a"
    original.write_bytes(damaged.data)
    out = tmp_path / "out.flac"
    out.unlink(missing_ok=True)
    prepared_or_refused(original, out, limit=60.0)


def test_a_call_too_long_fails_at_its_first_attempt_and_leaves_no_file(db, clean, sim, tmp_path):
    """End to end: the reason is recorded, the call is not retried, nothing is stored."""
    s = settings_for(sim, tmp_path, AUDIO_MAX_ATTEMPTS=3, AUDIO_MAX_DURATION_SEC=LIMIT)
    long_audio = make_flac(tmp_path / "long.flac", 4 * LIMIT, amplitude=8000).read_bytes()
    sim.handle_audio = lambda path: _Answer(long_audio, content_type="audio/flac")
    call, _ = publish(sim, db, sim.add_playlist())
    outcome = run_batch(clean, s)
    assert (outcome.ready, outcome.retry, outcome.failed) == (0, 0, 1)
    row = audio_rows(db)[call]
    assert (row["state"], row["error_code"], row["attempts"]) == ("failed", "too_long", 1)
    assert "AUDIO_MAX_DURATION_SEC" in row["last_error"]
    assert assert_stored_files_match(db, tmp_path / "store") == 0


def test_a_host_stopped_mid_upload_does_not_keep_its_call_locked(
    db, clean, sim, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """The files are stored while the call's row is locked. A host that stops (or loses the
    network) mid-upload says nothing more to the database: its lock must still end, or no
    other host could ever claim the call (claims skip locked rows)."""
    s = settings_for(
        sim, tmp_path, AUDIO_LEASE_SEC=1.0, HTTP_READ_TIMEOUT_SEC=1.0, HTTP_TOTAL_TIMEOUT_SEC=1.0
    )
    call, _ = publish(sim, db, sim.add_playlist())
    claimed = asyncio.run(claim(clean, s, "stalled"))
    rt = Runtime.current()
    prep = CallPreparer(s, rt.http, "stalled", "test:1")
    uploading, resume = threading.Event(), threading.Event()

    async def stalled_upload(files: object) -> None:
        uploading.set()
        await asyncio.get_running_loop().run_in_executor(None, resume.wait)

    monkeypatch.setattr(prep.store, "promote", stalled_upload)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(rt.run(prep.run(claimed.call_ids))))
    worker.start()
    try:
        wait_until(uploading.is_set, 60, "the upload to start")

        def claimable() -> bool:
            sql = "SELECT 1 FROM call_audio WHERE call_id = %s FOR UPDATE SKIP LOCKED"
            return db.execute(sql, (call,)).fetchone() is not None

        wait_until(claimable, 60, "the stalled host's lock on the call to end")
        # The host gave its upload up by itself (it does not wait on the stalled store).
        wait_until(lambda: bool(outcome), 60, "the stalled host to give up its upload")
    finally:
        resume.set()
        worker.join()
    # Its commit came too late: the call is not ready, but tried again.
    assert outcome and outcome[0].ready == 0  # type: ignore[attr-defined]
    assert audio_rows(db)[call]["state"] == "pending"
