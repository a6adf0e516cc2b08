"""Settings: defaults, a bad value names its variable, secrets never printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import ROOT
from workers.settings import SettingsError, load_settings


def test_defaults_are_the_old_schedulers():
    s = load_settings({})
    assert (s.ingest_interval_sec, s.audio_worker_interval_sec) == (10, 5)
    assert (s.transcription_dispatch_interval_sec, s.geo_refresh_interval_sec) == (30, 86400)
    assert s.job_misfire_grace_sec == 30 and s.lock_ttl_sec == 30
    assert s.audio_worker_batch_size == 20


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"INGEST_INTERVAL_SEC": "ten"}, "INGEST_INTERVAL_SEC"),
        ({"AUDIO_WORKER_BATCH_SIZE": "0"}, "AUDIO_WORKER_BATCH_SIZE"),
        ({"AUDIO_WORKER_BATCH_SIZE": "2.5"}, "AUDIO_WORKER_BATCH_SIZE"),
        ({"JOB_MISFIRE_GRACE_SEC": "nan"}, "JOB_MISFIRE_GRACE_SEC"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOCK_TTL_SEC": "10", "LOCK_RENEW_SEC": "8"}, "LOCK_RENEW_SEC"),
        ({"JOB_TIME_LIMIT_SEC": "4000"}, "BROKER_VISIBILITY_TIMEOUT_SEC"),
    ],
)
def test_a_bad_value_names_its_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_secrets_are_never_shown():
    s = load_settings(
        {
            "DATABASE_URL": "postgresql://app:hunter2@db:5432/bcfy",
            "REDIS_URL": "redis://:s3cret@cache:6379/0",
        }
    )
    shown = repr(s) + str(s.describe())
    assert "hunter2" not in shown and "s3cret" not in shown
    assert s.describe()["DATABASE_URL"] == "postgresql://app:***@db:5432/bcfy"
    assert s.database_url.reveal().endswith("hunter2@db:5432/bcfy")


def test_a_malformed_secret_is_not_echoed():
    with pytest.raises(SettingsError) as err:
        load_settings({"DATABASE_URL": "mysql://app:hunter2@db/x"})
    assert "DATABASE_URL" in str(err.value) and "hunter2" not in str(err.value)


def run(args, env):
    return subprocess.run(
        args,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_with_a_bad_setting_stops_at_start_with_the_name():
    out = run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker"],
        {"INGEST_INTERVAL_SEC": "-5"},
    )
    assert out.returncode != 0
    assert "INGEST_INTERVAL_SEC='-5' must be at least 0.1" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_prints_settings_redacted():
    out = run(
        [sys.executable, "-m", "workers.cli", "settings"],
        {"DATABASE_URL": "postgresql://app:hunter2@db/bcfy"},
    )
    assert out.returncode == 0
    assert "DATABASE_URL=postgresql://app:***@db/bcfy" in out.stdout
    assert "hunter2" not in out.stdout


def test_env_example_documents_every_setting_with_its_default():
    import dataclasses

    from workers.settings import Settings

    documented = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            documented[name] = value
    defaults = load_settings({}).describe()
    for f in dataclasses.fields(Settings):
        name = f.metadata["env"]
        assert name in documented, f"{name} is missing from .env.example"
        assert documented[name] == defaults[name], f"{name}: .env.example disagrees with default"
    assert load_settings(documented) == load_settings({})
