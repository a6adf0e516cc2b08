"""The audio store's layout and its write-then-rename discipline; the audio settings; the
`bcfy audio` commands."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

import pytest

from tests.support.audio import audio_rows, truncate_calls
from workers.audio.store import FilesystemAudioStore, call_keys
from workers.core.settings import SettingsError, load_settings
from workers.dev.calls import insert_call
from workers.dev.procs import run_cli


def test_files_are_laid_out_by_playlist_date_and_call():
    playlist = uuid.UUID("6f1c2d3e-0000-4000-8000-000000000001")
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert call_keys(42, playlist, when, "m4a") == (
        f"{playlist}/2026-01-02/42.m4a",
        f"{playlist}/2026-01-02/42.16k.flac",
    )
    assert call_keys(7, None, when, "mp3")[0] == "no-playlist/2026-01-02/7.mp3"


def test_promote_renames_whole_files_into_place_and_nothing_escapes_the_root(tmp_path):
    store = FilesystemAudioStore(tmp_path)
    temp = store.temp_file(5, "original")
    temp.write_bytes(b"audio")
    store.promote([(temp, "p/2026-01-02/5.m4a")])
    assert (tmp_path / "p/2026-01-02/5.m4a").read_bytes() == b"audio"
    assert not temp.exists() and store.temp_files() == []
    with pytest.raises(ValueError, match="outside the audio store"):
        store.local_path("../../etc/passwd")


def test_temporary_files_are_swept_per_call_and_by_age(tmp_path):
    store = FilesystemAudioStore(tmp_path)
    mine = [store.temp_file(1, "original"), store.temp_file(1, "prepared")]
    other = store.temp_file(2, "original")
    assert len({*mine, other}) == 3, "unique names"
    assert store.discard_temps(1) == 2 and store.temp_files() == [other]
    old = time.time() - 3600
    os.utime(other, (old, old))
    fresh = store.temp_file(3, "original")
    assert store.sweep_temps(older_than_sec=600) == 1
    assert store.temp_files() == [fresh]


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
