"""The audio stage with real worker processes on real PostgreSQL and Redis, fed by the feed
simulator over real HTTP: one trigger drains a backlog in batches no larger than the batch
size; each bad call fails with its reason; two workers share the work without ever taking the
same call; SIGKILL of a worker mid-batch ends with every call ready exactly once after the
lease, and the temporary files it left are gone."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.audio import (
    add_calls,
    assert_stored_files_match,
    attempts,
    audio_rows,
    lease_env,
    make_env,
    start_audio,
    states,
)
from tests.support.ingest import api_env, follow_with_cli
from tests.support.procs import start_worker
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.dev.calls import insert_call, publish, slow_audio
from workers.dev.procs import wait_until
from workers.dev.simulator import AudioFault

pytestmark = pytest.mark.slow

CLAIM_JOB = "tasks.audio.process_pending_audio"
DISPATCH = "tasks.transcription.dispatch_ready_calls"


def test_one_trigger_drains_a_backlog_in_batches_no_larger_than_the_batch(
    db, clean, procs, client, sim, tmp_path
):
    slow_audio(sim, 0.05)
    calls = add_calls(db, sim, 45)
    env = make_env(clean, tmp_path, sim, AUDIO_WORKER_BATCH_SIZE="10", AUDIO_MAX_IN_FLIGHT="20")
    start_audio(procs, env, tmp_path)
    # What ingest does after storing new calls; no beat runs in this test.
    client.send_task(CLAIM_JOB, queue="audio")
    wait_until(lambda: states(db).get("ready") == len(calls), 60, "every call ready")

    per_claim: dict[str, int] = {}
    for _, owner, _, outcome in attempts(db):
        assert outcome == "ready"
        per_claim[owner] = per_claim.get(owner, 0) + 1
    assert len(attempts(db)) == len(calls), "each call prepared once"
    assert max(per_claim.values()) <= 10, f"a claim took more than the batch: {per_claim}"
    assert len(per_claim) >= 5
    assert assert_stored_files_match(db, tmp_path / "store") == len(calls)
    assert sim.requests["audio"] == len(calls), "each file downloaded once"
    assert DISPATCH in clean.queued_tasks("ingest"), "transcription dispatch was triggered"


def test_each_bad_call_fails_with_its_reason_and_the_rest_become_ready(
    db, clean, procs, sim, tmp_path
):
    playlist = sim.add_playlist()
    good = dict(publish(sim, db, playlist) for _ in range(6))
    reasons = {
        AudioFault.MISSING: ("http_404", "answered 404", 2),
        AudioFault.TRUNCATED: ("truncated", "bytes the service announced", 2),
        AudioFault.WRONG_TYPE: ("not_audio", "Content-Type text/html", 2),
        AudioFault.OVERSIZE: ("too_large", "Content-Length", 1),
        AudioFault.OVERSIZE_UNDECLARED: ("too_large", "exceeds 25000000 bytes", 1),
        AudioFault.SILENCE: ("silence", "silent from end to end", 2),
        AudioFault.REDIRECT_INTERNAL: (
            "internal_address",
            "169.254.169.254 is a link-local address",
            1,
        ),
    }
    bad = {publish(sim, db, playlist, fault)[0]: why for fault, why in reasons.items()}
    bad[insert_call(db, "https://example.com/call.m4a", 4.0)] = (
        "disallowed_host",
        "example.com is not in AUDIO_ALLOWED_HOSTS",
        1,
    )
    env = make_env(
        clean,
        tmp_path,
        sim,
        AUDIO_WORKER_INTERVAL_SEC="1",
        AUDIO_MAX_ATTEMPTS="2",
        AUDIO_RETRY_BASE_SEC="0.5",
    )
    start_audio(procs, env, tmp_path, beat=True)
    wait_until(lambda: states(db) == {"ready": len(good), "failed": len(bad)}, 60, "all settled")
    rows = audio_rows(db)
    for call_id, (code, text, tries) in bad.items():
        row = rows[call_id]
        assert row["error_code"] == code and text in row["last_error"], row
        assert row["attempts"] == tries, f"{code}: {row['attempts']} attempts"
    assert assert_stored_files_match(db, tmp_path / "store") == len(good)


def test_two_workers_share_the_work_and_never_take_the_same_call(
    db, clean, procs, client, sim, tmp_path
):
    slow_audio(sim, 0.3)
    calls = add_calls(db, sim, 64)
    env = make_env(
        clean,
        tmp_path,
        sim,
        AUDIO_WORKER_BATCH_SIZE="16",
        AUDIO_MAX_IN_FLIGHT="32",
        AUDIO_DOWNLOAD_CONCURRENCY="4",
    )
    for name in ("a1", "a2"):
        start_audio(procs, env, tmp_path, name)
    client.send_task(CLAIM_JOB, queue="audio")
    wait_until(lambda: states(db).get("ready") == len(calls), 90, "every call ready")

    rows = attempts(db)
    assert len(rows) == len(calls) and len({r[0] for r in rows}) == len(calls)
    by_host: dict[str, int] = {}
    for _, _, worker, _ in rows:
        host = worker.split("@")[0]
        by_host[host] = by_host.get(host, 0) + 1
    assert set(by_host) == {"a1", "a2"}, by_host
    assert min(by_host.values()) >= len(calls) // 4, f"one worker idled: {by_host}"
    assert sim.requests["audio"] == len(calls), "each file downloaded once"
    assert assert_stored_files_match(db, tmp_path / "store") == len(calls)


def test_sigkill_mid_batch_ends_with_every_call_ready_exactly_once(db, clean, procs, sim, tmp_path):
    slow_audio(sim, 2.0)
    calls = add_calls(db, sim, 20)
    env = lease_env(clean, tmp_path, sim, batch=20, downloads=7, lease=3)
    doomed = start_audio(procs, env, tmp_path, concurrency=1, beat=True)
    # The first chunk's downloads are under way, one per download slot (their attempts are
    # logged as they start; the next starts only when one of these 2-second downloads ends).
    wait_until(lambda: len(attempts(db)) >= 7, 30, "downloads under way")
    killed = {r[0] for r in attempts(db)}
    doomed.kill_group(signal.SIGKILL)
    doomed.popen.wait(10)
    assert states(db).get("ready", 0) == 0
    assert FilesystemAudioStore(tmp_path / "store").work.temp_files(), "the dead left temp files"
    time.sleep(1)
    start_audio(procs, env, tmp_path, "a2")
    wait_until(lambda: states(db).get("ready") == len(calls), 60, "every call ready")

    rows = audio_rows(db)
    for call_id in calls:
        done = [a for a in attempts(db) if a[0] == call_id and a[3] == "ready"]
        assert len(done) == 1, f"call {call_id} ready {len(done)} times"
        assert done[0][2].startswith("a2@")
        if call_id in killed:
            assert rows[call_id]["attempts"] == 2, "claimed again after the lease ran out"
    abandoned = [a for a in attempts(db) if a[3] is None]
    assert {a[0] for a in abandoned} == killed
    assert all(a[2].startswith("a1@") for a in abandoned)
    assert assert_stored_files_match(db, tmp_path / "store") == len(calls)


def test_calls_stored_by_ingest_are_prepared_at_once_without_waiting_for_a_tick(
    db, clean, procs, client, sim, tmp_path
):
    """The hand-off: ingest stores new calls and triggers the audio job by name; no beat runs."""
    playlist = sim.add_playlist()
    records = [sim.publish_call(playlist) for _ in range(6)]
    records.append(sim.publish_call(playlist, audio=AudioFault.MISSING))
    time.sleep(1.2)  # published calls show from the next whole second
    env = make_env(
        clean,
        tmp_path,
        sim,
        **api_env(sim),
        AUDIO_MAX_ATTEMPTS="1",
    )
    follow_with_cli(env, playlist)
    procs.append(start_worker("ing", env, tmp_path, queues="ingest", concurrency=1))
    start_audio(procs, env, tmp_path)
    client.send_task("tasks.ingest.poll_followed_playlists", queue="ingest")
    wait_until(lambda: states(db) == {"ready": 6, "failed": 1}, 60, "the calls prepared")

    ready = db.execute(
        "SELECT r.url FROM call_audio a JOIN bcfy_calls_raw r ON r.id = a.call_id"
        " WHERE a.state = 'ready'"
    ).fetchall()
    assert sorted(u for (u,) in ready) == sorted(r["url"] for r in records[:6])
    # Transcription picks them up from here (its trigger on call_audio made their rows).
    (queued,) = db.execute("SELECT count(*) FROM call_transcription").fetchone()
    assert queued == 6
    assert assert_stored_files_match(db, tmp_path / "store") == 6
