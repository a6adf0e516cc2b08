"""The pipeline with its audio in S3 (a real SeaweedFS), through the real worker processes: the
audio pool prepares calls into the bucket and keeps no copy in its work directory; the
transcription pool reads them from the bucket, refuses one changed behind its back, and leaves
no fetched copy; a call that fails for good leaves no object (even one an earlier attempt
uploaded, or one whose commit failed after its upload); retention deletes objects with their
rows; a worker whose credentials are refused does not start; `bcfy search` gives a
time-limited link to the audio."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import obstore
import pytest

from tasks.audio.preparation import CallPreparer, ChunkOutcome
from tests.support.audio import add_calls, audio_rows, claim, files_in, make_env, start_audio
from tests.support.procs import refused_start, start_worker
from tests.support.s3 import FlakyS3
from tests.support.transcription import start_transcription
from workers.audio.prepare import ORIGINAL_EXTENSIONS
from workers.audio.store import call_keys, store_for
from workers.audio.store.s3 import S3AudioStore
from workers.core.runtime import Runtime
from workers.core.settings import Secret, Settings, get_settings, load_settings
from workers.dev.calls import insert_call, publish
from workers.dev.procs import run_cli, wait_until
from workers.dev.simulator import AudioFault

pytestmark = pytest.mark.slow

CLAIM_JOB = "tasks.audio.process_pending_audio"


def exists(store: S3AudioStore, key: str) -> bool:
    try:
        obstore.head(store.client(), store.path(key))
    except FileNotFoundError:
        return False
    return True


def failed_calls_keys(store: S3AudioStore, row: dict) -> list[str]:
    return sorted(
        {
            key
            for ext in ORIGINAL_EXTENSIONS
            for key in call_keys(row["call_id"], row["playlist_uuid"], row["started_at"], ext)
        }
    )


def test_calls_go_through_s3_with_no_shared_directory(
    db, clean, procs, client, sim, s3_env, tmp_path
):
    good = add_calls(db, sim, 4)
    playlist = sim.add_playlist()
    doomed, _ = publish(sim, db, playlist, AudioFault.OVERSIZE)  # fails for good at once
    no_dir = tmp_path / "no-shared-directory"
    env = make_env(clean, tmp_path, sim, **s3_env) | {
        "AUDIO_STORE_DIR": str(no_dir),
        "AUDIO_WORK_DIR": str(tmp_path / "audio-host-work"),
    }
    s = load_settings(env)
    store = store_for(s)
    assert isinstance(store, S3AudioStore)
    # As if an earlier attempt had uploaded the doomed call's files and then failed to commit.
    row = next(r for r in sql_calls(db) if r["call_id"] == doomed)
    leftovers = [k for k in failed_calls_keys(store, row) if k.endswith((".mp3", ".16k.flac"))]
    for key in leftovers:
        obstore.put(store.client(), store.path(key), b"uploaded, never committed")

    start_audio(procs, env, tmp_path)
    client.send_task(CLAIM_JOB, queue="audio")
    wait_until(
        lambda: sorted(r["state"] for r in audio_rows(db).values()) == ["failed"] + ["ready"] * 4,
        90,
        "every call prepared or failed",
    )

    rows = audio_rows(db)
    for call_id in good:
        for kind in ("original", "prepared"):
            key, sha256 = rows[call_id][f"{kind}_path"], rows[call_id][f"{kind}_sha256"]
            copy = asyncio.run(store.fetch(key, sha256, call_id))  # checks the sha256
            assert copy.stat().st_size == rows[call_id][f"{kind}_bytes"]
            store.release(copy)
    assert not no_dir.exists(), "nothing written to a local store"
    assert files_in(tmp_path / "audio-host-work") == [], "no copy left in the work dir"
    assert rows[doomed]["error_code"] == "too_large"
    assert not any(exists(store, k) for k in failed_calls_keys(store, row))

    # One call's prepared audio changed behind the store's back: refused, never transcribed.
    corrupt = next(iter(good))
    obstore.put(store.client(), store.path(rows[corrupt]["prepared_path"]), b"not the call")
    asr_env = env | {"AUDIO_WORK_DIR": str(tmp_path / "asr-host-work")}
    procs.append(start_worker("ingest", asr_env, tmp_path, queues="ingest"))
    start_transcription(procs, asr_env, tmp_path)
    client.send_task("tasks.transcription.dispatch_ready_calls", queue="ingest")

    def finished() -> dict[int, str]:
        return dict(db.execute("SELECT call_id, state FROM call_transcription").fetchall())

    wait_until(
        lambda: sorted(finished().values()) == ["done"] * 3 + ["failed"], 120, "all transcribed"
    )
    assert finished()[corrupt] == "failed"
    (why,) = db.execute(
        "SELECT last_error FROM call_transcription WHERE call_id = %s", (corrupt,)
    ).fetchone()
    assert "prepared audio is corrupt" in why and "sha256" in why
    assert db.execute("SELECT count(*) FROM transcripts").fetchone() == (3,)
    assert files_in(tmp_path / "asr-host-work") == [], "fetched copies removed"

    # Retention: the originals' objects go with their columns (7 days after preparation).
    db.execute("UPDATE call_audio SET ready_at = now() - interval '8 days' WHERE state = 'ready'")
    originals = [rows[c]["original_path"] for c in good]
    assert all(exists(store, k) for k in originals)
    from tasks.maintenance.jobs import run_maintenance

    report = Runtime.current().run(run_maintenance(s))
    Runtime.shutdown_current()
    assert report.pruned.get("original_audio") == 4
    assert not any(exists(store, k) for k in originals)
    assert all(r["original_path"] is None for c, r in audio_rows(db).items() if c in good)
    assert all(exists(store, audio_rows(db)[c]["prepared_path"]) for c in good)
    for proc in procs:
        # The S3 client (obstore, with its runtime's threads) was made in the pool processes,
        # after the fork, never in a worker's parent process.
        assert "_obstore" not in Path(f"/proc/{proc.pid}/maps").read_text(), proc.name
    audio_pool = Path(f"/proc/{procs[0].pid}/task/{procs[0].pid}/children").read_text().split()
    assert any("_obstore" in Path(f"/proc/{pid}/maps").read_text() for pid in audio_pool)
    for proc in procs:  # the workers' logs: never the secret, never a signed URL
        assert s3_env["AUDIO_S3_SECRET_ACCESS_KEY"] not in proc.log()
        assert "X-Amz-Signature" not in proc.log() and "X-Amz-Credential" not in proc.log()


def sql_calls(db) -> list[dict]:
    cur = db.execute("SELECT c.id AS call_id, c.playlist_uuid, c.started_at FROM bcfy_calls_raw c")
    return [dict(zip(("call_id", "playlist_uuid", "started_at"), r, strict=True)) for r in cur]


@pytest.mark.parametrize("queue", ["audio", "transcription", "ingest"])
def test_a_worker_whose_store_credentials_are_refused_does_not_start(
    queue, clean, s3_env, tmp_path
):
    """Every pool that touches the store (ingest: retention's deletes) checks it at start."""
    secret = "not-" + s3_env["AUDIO_S3_SECRET_ACCESS_KEY"][::-1]
    env = s3_env | {"AUDIO_S3_SECRET_ACCESS_KEY": secret, "AUDIO_WORK_DIR": str(tmp_path)}
    out = refused_start(queue, clean, env)
    assert out.returncode != 0
    assert "bcfy: cannot start" in out.stderr and "AUDIO_S3_SECRET_ACCESS_KEY" in out.stderr
    assert "Traceback" not in out.stderr and secret not in out.stderr + out.stdout


def test_search_shows_a_time_limited_link_to_the_audio_in_s3(db, clean, s3_env, tmp_path):
    env = clean.worker_env(tmp_path, **s3_env, AUDIO_S3_LINK_TTL_SEC="600")
    store = store_for(load_settings(env))
    assert isinstance(store, S3AudioStore)
    call_id = insert_call(db, "https://calls.broadcastify.com/x.m4a", 5.0)
    key = f"no-playlist/2026-01-02/{call_id}.16k.flac"
    obstore.put(store.client(), store.path(key), b"fLaC the call")
    db.execute(
        "UPDATE call_audio SET state = 'ready', prepared_path = %s, ready_at = now()"
        " WHERE call_id = %s",
        (key, call_id),
    )
    db.execute(
        "INSERT INTO transcripts (call_id, text, backend, model, confidence)"
        " VALUES (%s, 'structure fire on main street', 'pocketsphinx', 'test', 0.8)",
        (call_id,),
    )
    found = run_cli("search", "fire", "--json", env=env)
    assert found.returncode == 0, found.stderr
    (hit,) = json.loads(found.stdout)
    assert hit["audio_path"] is None and "X-Amz-Expires=600" in hit["audio_url"]
    assert hit["audio_url_expires_at"] > datetime.now(UTC).isoformat()
    assert httpx.get(hit["audio_url"]).content == b"fLaC the call"
    text = run_cli("search", "fire", env=env)
    assert text.returncode == 0 and "X-Amz-Signature=" in text.stdout
    assert "link valid until" in text.stdout
    assert s3_env["AUDIO_S3_SECRET_ACCESS_KEY"] not in found.stdout + text.stdout


REFUSE_COMMIT = """
CREATE FUNCTION test_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the commit fails (test)'; END $$;
CREATE CONSTRAINT TRIGGER test_refuse_ready AFTER UPDATE ON call_audio
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.state = 'ready')
  EXECUTE FUNCTION test_refuse_commit();
"""


def through_proxy(
    s3_env: dict[str, str], proxy: FlakyS3, sim, tmp_path: Path
) -> tuple[Settings, S3AudioStore]:
    """In-process audio settings on the S3 store behind `proxy`, one attempt per call; and
    that store."""
    s = get_settings().with_values(
        AUDIO_STORE_URL=s3_env["AUDIO_STORE_URL"],
        AUDIO_S3_ENDPOINT=proxy.endpoint,
        AUDIO_S3_ACCESS_KEY_ID=s3_env["AUDIO_S3_ACCESS_KEY_ID"],
        AUDIO_S3_SECRET_ACCESS_KEY=Secret(s3_env["AUDIO_S3_SECRET_ACCESS_KEY"]),
        AUDIO_S3_PATH_STYLE="true",
        AUDIO_WORK_DIR=str(tmp_path / "work"),
        AUDIO_ALLOWED_HOSTS=(sim.audio_host,),
        AUDIO_ALLOWED_INTERNAL_NETWORKS=("127.0.0.1/32",),
        AUDIO_MAX_ATTEMPTS=1,
    )
    store = store_for(s)
    assert isinstance(store, S3AudioStore)
    return s, store


def prepare_refusing_commit(db, clean, s: Settings) -> ChunkOutcome:
    """Prepare the pending call in this process with its commit refused (a trigger)."""
    db.execute(REFUSE_COMMIT)
    try:
        claimed = asyncio.run(claim(clean, s, "test-claim"))
        rt = Runtime.current()
        return rt.run(CallPreparer(s, rt.http, "test-claim", "test:1").run(claimed.call_ids))
    finally:
        db.execute("DROP TRIGGER test_refuse_ready ON call_audio")
        db.execute("DROP FUNCTION test_refuse_commit()")
        Runtime.shutdown_current()


def test_files_uploaded_by_an_attempt_whose_commit_failed_go_when_the_call_fails(
    db, clean, sim, s3_env, tmp_path
):
    call_id, _ = publish(sim, db, sim.add_playlist())
    (row,) = [r for r in sql_calls(db) if r["call_id"] == call_id]
    with FlakyS3(s3_env["AUDIO_S3_ENDPOINT"], failures=0) as counted:
        s, store = through_proxy(s3_env, counted, sim, tmp_path)
        done = prepare_refusing_commit(db, clean, s)
        assert done.failed == 1
        state, code, error = db.execute(
            "SELECT state, error_code, last_error FROM call_audio WHERE call_id = %s", (call_id,)
        ).fetchone()
        assert (state, code) == ("failed", "internal") and "the commit fails" in error
        prepared = call_keys(call_id, row["playlist_uuid"], row["started_at"], "m4a")[1]
        uploads = [path for method, path in counted.requests if method == "PUT"]
        assert any(path.endswith(prepared) for path in uploads), "uploaded before the commit"
        assert not any(exists(store, k) for k in failed_calls_keys(store, row)), "and gone"


def test_files_of_a_failed_call_the_store_would_not_delete_go_with_the_next_maintenance(
    db, clean, sim, s3_env, tmp_path
):
    """The store refuses the deletes when the call fails for good: its files are listed in
    retention's trash, and the next maintenance run removes them."""
    call_id, _ = publish(sim, db, sim.add_playlist())
    (row,) = [r for r in sql_calls(db) if r["call_id"] == call_id]
    with FlakyS3(s3_env["AUDIO_S3_ENDPOINT"], failures=0) as proxy:
        s, store = through_proxy(s3_env, proxy, sim, tmp_path)
        proxy.refuse_deletes = True
        assert prepare_refusing_commit(db, clean, s).failed == 1
        keys = failed_calls_keys(store, row)
        prepared = call_keys(call_id, row["playlist_uuid"], row["started_at"], "m4a")[1]
        assert exists(store, prepared), "uploaded, and not deleted (the store refused)"
        trash = db.execute("SELECT key, call_id FROM audio_file_trash").fetchall()
        assert sorted(trash) == [(k, call_id) for k in keys]
        proxy.refuse_deletes = False
        from tasks.maintenance.jobs import run_maintenance

        Runtime.current().run(run_maintenance(s))
        Runtime.shutdown_current()
        assert not any(exists(store, k) for k in keys)
    assert db.execute("SELECT count(*) FROM audio_file_trash").fetchone() == (0,)
