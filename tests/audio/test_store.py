"""The audio store's contract, for each backend (the filesystem, and S3 on a real SeaweedFS):
whole objects under their keys with their sha256 checked on read, multipart for large ones,
corruption refused, links, deletes, and the named-setting errors; the filesystem store's
layout and temporary files; the store's settings."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import obstore
import pytest

from tests.support.audio import audio_rows, files_in, truncate_calls
from tests.support.s3 import FlakyS3
from workers.audio.store import (
    AudioStore,
    StoreConfigError,
    StoredAudioMismatch,
    StoredAudioMissing,
    StoreError,
    call_keys,
    store_for,
)
from workers.audio.store.check import check_store
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.audio.store.s3 import FETCHED_STALE_SEC, MULTIPART_CHUNK, S3AudioStore
from workers.core.settings import Settings, SettingsError, load_settings
from workers.dev.calls import insert_call
from workers.dev.procs import run_cli

KEY = "6f1c2d3e-0000-4000-8000-000000000001/2026-01-02/42.16k.flac"


@dataclass
class Backend:
    name: str
    settings: Settings
    store: AudioStore

    def overwrite(self, key: str, data: bytes) -> None:
        """Change an object behind the store's back (a disk fault, a hand edit)."""
        if isinstance(self.store, S3AudioStore):
            obstore.put(self.store.client(), self.store.path(key), data)
        else:
            assert isinstance(self.store, FilesystemAudioStore)
            self.store.local_path(key).write_bytes(data)


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    env = {"AUDIO_STORE_DIR": str(tmp_path / "store")}
    if request.param == "s3":
        env |= request.getfixturevalue("s3_env") | {"AUDIO_WORK_DIR": str(tmp_path / "work")}
    s = load_settings(env)
    return Backend(request.param, s, store_for(s))


def stored(store: AudioStore, files: dict[str, bytes], call_id: int = 42) -> dict[str, str]:
    """Write each file in the work directory, promote them; {key: sha256}."""
    temps = []
    for key, data in files.items():
        temp = store.work.temp_file(call_id, "test")
        temp.write_bytes(data)
        temps.append((temp, key))
    asyncio.run(store.promote(temps))
    store.work.discard(*(t for t, _ in temps))
    return {key: hashlib.sha256(data).hexdigest() for key, data in files.items()}


def read(store: AudioStore, key: str, sha256: str | None) -> bytes:
    path = asyncio.run(store.fetch(key, sha256, 42))
    try:
        return path.read_bytes()
    finally:
        store.release(path)


def test_objects_round_trip_whole_with_their_sha256(backend: Backend) -> None:
    store = backend.store
    files = {KEY: b"fLaC prepared", KEY.replace(".16k.flac", ".m4a"): os.urandom(3000)}
    digests = stored(store, files)
    for key, data in files.items():
        assert read(store, key, digests[key]) == data
    # Written again by a later attempt: replaced whole.
    digests |= stored(store, {KEY: b"second attempt"})
    assert read(store, KEY, digests[KEY]) == b"second attempt"
    assert files_in(store.work.path) == [], "nothing left in the work directory"


def test_a_large_object_goes_in_parts_and_reads_back_equal(backend: Backend) -> None:
    data = os.urandom(2 * MULTIPART_CHUNK + 12345)
    digests = stored(backend.store, {KEY: data})
    assert read(backend.store, KEY, digests[KEY]) == data
    if isinstance(backend.store, S3AudioStore):
        meta = obstore.head(backend.store.client(), backend.store.path(KEY))
        # A multipart upload's ETag is "<md5 of the parts' md5s>-<number of parts>".
        assert str(meta["e_tag"]).strip('"').endswith("-3"), meta


def test_an_object_changed_behind_the_stores_back_is_refused_on_read(backend: Backend) -> None:
    digests = stored(backend.store, {KEY: b"the call's audio"})
    backend.overwrite(KEY, b"other audio, same length")
    with pytest.raises(StoredAudioMismatch, match="sha256"):
        read(backend.store, KEY, digests[KEY])
    assert files_in(backend.store.work.path) == [], "the bad copy is not kept"


def test_copies_left_by_killed_readers_are_removed_by_later_reads(s3_env, tmp_path) -> None:
    """A transcription process killed while recognising (its hard time limit) leaves its fetched
    copy; a later read on the host removes copies that old, and keeps fresh ones (a reader in
    another process may be using them)."""
    store = store_for(load_settings(s3_env | {"AUDIO_WORK_DIR": str(tmp_path / "work")}))
    assert isinstance(store, S3AudioStore)
    digests = stored(store, {KEY: b"audio"})
    old, fresh = store.fetched.temp_file(7, "fetched"), store.fetched.temp_file(8, "fetched")
    stale = time.time() - FETCHED_STALE_SEC - 60
    os.utime(old, (stale, stale))
    assert read(store, KEY, digests[KEY]) == b"audio"
    assert not old.exists()
    assert fresh.exists()


def test_deleted_objects_are_gone_and_deleting_twice_is_fine(backend: Backend) -> None:
    other = KEY.replace("42.", "43.")
    digests = stored(backend.store, {KEY: b"a", other: b"b"})
    asyncio.run(backend.store.delete([KEY, KEY.replace(".16k.flac", ".mp3")]))
    with pytest.raises(StoredAudioMissing):
        read(backend.store, KEY, digests[KEY])
    asyncio.run(backend.store.delete([KEY]))
    assert read(backend.store, other, digests[other]) == b"b", "only what was named"


def test_a_link_gets_the_audio_until_it_expires(backend: Backend) -> None:
    stored(backend.store, {KEY: b"listen here"})
    link = asyncio.run(backend.store.link(KEY))
    if isinstance(backend.store, FilesystemAudioStore):
        assert Path(link).read_bytes() == b"listen here"
        return
    assert "X-Amz-Signature" in link and "X-Amz-Expires=3600" in link
    assert httpx.get(link).content == b"listen here"
    short = store_for(backend.settings.with_values(AUDIO_S3_LINK_TTL_SEC=1.0))
    expiring = asyncio.run(short.link(KEY))
    assert "X-Amz-Expires=1&" in expiring
    time.sleep(2.5)  # a lower bound: the link's second has passed (signed alike: see above)
    assert httpx.get(expiring).status_code == 403


def test_a_stray_aws_session_token_is_not_sent_with_the_configured_keys(
    s3_env, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token of some other account left in the worker's environment: obstore reads AWS_*.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stray-token-of-another-account")
    s = load_settings(s3_env | {"AUDIO_WORK_DIR": str(tmp_path)})
    store = S3AudioStore(s.audio, s.services)  # its client made with the variable set
    digests = stored(store, {KEY: b"signed with our keys alone"})
    assert read(store, KEY, digests[KEY]) == b"signed with our keys alone"
    link = asyncio.run(store.link(KEY))
    assert "X-Amz-Security-Token" not in link and "stray-token" not in link
    assert httpx.get(link).content == b"signed with our keys alone"


def test_a_missing_bucket_or_refused_credentials_name_the_setting(s3_env, tmp_path) -> None:
    secret = s3_env["AUDIO_S3_SECRET_ACCESS_KEY"]
    base = s3_env | {"AUDIO_WORK_DIR": str(tmp_path)}
    missing = load_settings(base | {"AUDIO_STORE_URL": f"s3://no-such-{uuid.uuid4().hex[:8]}"})
    with pytest.raises(StoreConfigError, match=r"AUDIO_STORE_URL=s3://no-such-.*does not exist"):
        asyncio.run(store_for(missing).check())
    wrong = "wrong-" + secret[::-1] + "-x"
    refused = load_settings(base | {"AUDIO_S3_SECRET_ACCESS_KEY": wrong})
    with pytest.raises(StoreConfigError) as caught:
        asyncio.run(store_for(refused).check())
    assert "AUDIO_S3_ACCESS_KEY_ID / AUDIO_S3_SECRET_ACCESS_KEY" in str(caught.value)
    unknown = load_settings(base | {"AUDIO_S3_ACCESS_KEY_ID": "nobody"})
    with pytest.raises(StoreConfigError, match="AUDIO_S3_ACCESS_KEY_ID"):
        asyncio.run(store_for(unknown).check(write=True))
    # The worker's start-up check (in a child process): the same words, never the secret.
    said = check_store(refused, write=True)
    assert said and "AUDIO_S3_SECRET_ACCESS_KEY" in said
    assert check_store(load_settings(base), write=True) is None
    for text in (str(caught.value), said, str(refused.describe())):
        assert wrong not in text and secret not in text


def test_an_s3_server_refusing_for_a_while_is_retried_with_backoff(s3_env, tmp_path) -> None:
    with FlakyS3(s3_env["AUDIO_S3_ENDPOINT"], failures=3) as flaky:
        s = load_settings(
            s3_env | {"AUDIO_S3_ENDPOINT": flaky.endpoint, "AUDIO_WORK_DIR": str(tmp_path)}
        )
        digests = stored(store_for(s), {KEY: b"through a busy server"})
        assert flaky.refused == 3 and flaky.passed >= 1, "refused, then retried"
        assert read(store_for(s), KEY, digests[KEY]) == b"through a busy server"
        # A server that keeps refusing: a short error once the retries are spent.
        flaky.failures = 10**6
        with pytest.raises(StoreError, match="503") as caught:
            read(store_for(s), KEY, digests[KEY])
        assert flaky.refused > 3 + 1, "retried before giving up"
        with pytest.raises(StoreError, match="storing"):  # the first failure, not a group
            stored(store_for(s), {KEY: b"x", KEY.replace("42.", "43."): b"y"})
        assert s3_env["AUDIO_S3_SECRET_ACCESS_KEY"] not in str(caught.value)
        assert len(str(caught.value)) < 600


# --- the filesystem store's own --------------------------------------------------------------


def test_files_are_laid_out_by_playlist_date_and_call() -> None:
    playlist = uuid.UUID("6f1c2d3e-0000-4000-8000-000000000001")
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert call_keys(42, playlist, when, "m4a") == (
        f"{playlist}/2026-01-02/42.m4a",
        f"{playlist}/2026-01-02/42.16k.flac",
    )
    assert call_keys(7, None, when, "mp3")[0] == "no-playlist/2026-01-02/7.mp3"


def test_promote_renames_whole_files_into_place_and_nothing_escapes_the_root(tmp_path) -> None:
    store = FilesystemAudioStore(tmp_path)
    temp = store.work.temp_file(5, "original")
    temp.write_bytes(b"audio")
    asyncio.run(store.promote([(temp, "p/2026-01-02/5.m4a")]))
    assert (tmp_path / "p/2026-01-02/5.m4a").read_bytes() == b"audio"
    assert not temp.exists() and store.work.temp_files() == []
    with pytest.raises(ValueError, match="outside the audio store"):
        store.local_path("../../etc/passwd")


def test_a_work_directory_on_another_filesystem_still_promotes_whole_files(tmp_path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem")
    work = shm / f"bcfy-test-{uuid.uuid4().hex[:8]}"
    store = FilesystemAudioStore(tmp_path / "store", work)
    temp = store.work.temp_file(5, "original")
    temp.write_bytes(b"copied across")
    asyncio.run(store.promote([(temp, "p/d/5.m4a")]))
    assert (tmp_path / "store/p/d/5.m4a").read_bytes() == b"copied across"
    assert list(work.iterdir()) == [] and list((tmp_path / "store/p/d").iterdir()) != []
    work.rmdir()


def test_temporary_files_are_swept_per_call_and_by_age(tmp_path) -> None:
    work = FilesystemAudioStore(tmp_path).work
    mine = [work.temp_file(1, "original"), work.temp_file(1, "prepared")]
    other = work.temp_file(2, "original")
    assert len({*mine, other}) == 3, "unique names"
    assert work.discard_temps(1) == 2 and work.temp_files() == [other]
    old = time.time() - 3600
    os.utime(other, (old, old))
    fresh = work.temp_file(3, "original")
    assert work.sweep_temps(older_than_sec=600) == 1
    assert work.temp_files() == [fresh]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AUDIO_ALLOWED_HOSTS": "calls.broadcastify.com/x"}, "AUDIO_ALLOWED_HOSTS"),
        ({"AUDIO_ALLOWED_HOSTS": "host:99999"}, "AUDIO_ALLOWED_HOSTS"),
        ({"AUDIO_ALLOWED_INTERNAL_NETWORKS": "localhost"}, "AUDIO_ALLOWED_INTERNAL_NETWORKS"),
        ({"AUDIO_DOWNLOAD_CONCURRENCY": "0"}, "AUDIO_DOWNLOAD_CONCURRENCY"),
        ({"AUDIO_MAX_IN_FLIGHT": "10"}, "AUDIO_MAX_IN_FLIGHT"),
        ({"AUDIO_RETRY_BASE_SEC": "100", "AUDIO_RETRY_MAX_SEC": "10"}, "AUDIO_RETRY_BASE_SEC"),
    ],
)
def test_a_bad_audio_setting_names_its_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_audio_settings_default_to_the_service_hosts_and_no_internal_networks():
    s = load_settings({})
    assert tuple(s.audio.allowed_hosts) == ("calls.broadcastify.com", "calls-ai-1.broadcastify.com")
    assert tuple(s.audio.allowed_internal_networks) == ()
    s = load_settings(
        {
            "AUDIO_ALLOWED_HOSTS": "127.0.0.1:8089, *.example.org",
            "AUDIO_ALLOWED_INTERNAL_NETWORKS": "127.0.0.1",
        }
    )
    assert str(s.audio.allowed_hosts) == "127.0.0.1:8089,*.example.org"
    assert str(s.audio.allowed_internal_networks) == "127.0.0.1/32"


def test_bcfy_audio_status_and_retry(clean):
    with clean.db() as db:
        truncate_calls(db)
        failed = insert_call(db, "https://x.example/a.m4a", 4.0)
        insert_call(db, "https://x.example/b.m4a", 4.0)
        db.execute(
            "UPDATE call_audio SET state = 'failed', attempts = 3, error_code = 'http_404'"
            " WHERE call_id = %s",
            (failed,),
        )
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": clean.database_url}

        def bcfy(*args: str) -> str:
            out = run_cli("audio", *args, env=env)
            assert out.returncode == 0, out.stderr
            return out.stdout

        shown = bcfy("status")
        assert "failed" in shown and "http_404" in shown and "pending" in shown
        assert "0 failed calls back" in bcfy("retry", "--code", "too_large")
        assert "1 failed calls back to pending" in bcfy("retry", "--code", "http_404")
        row = audio_rows(db)[failed]
        assert (row["state"], row["attempts"]) == ("pending", 0)
