"""Settings: defaults, a bad value names its variable, secrets never printed."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from workers.core.settings import SettingsError, load_settings
from workers.dev.procs import ROOT


def test_defaults_are_the_old_schedulers():
    s = load_settings({})
    assert (s.jobs.ingest_interval_sec, s.jobs.audio_worker_interval_sec) == (10, 5)
    assert (s.jobs.transcription_dispatch_interval_sec, s.jobs.geo_refresh_interval_sec) == (
        30,
        86400,
    )
    assert s.jobs.misfire_grace_sec == 30 and s.jobs.lock_ttl_sec == 30
    assert s.audio.worker_batch_size == 20


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
    assert s.services.database_url.reveal().endswith("hunter2@db:5432/bcfy")


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


def test_a_bad_setting_stops_the_cli_with_its_own_exit_code_and_the_name():
    """The CLI reads the settings in main() and reports a bad one with exit code 2; no module
    it imports reads them first (which exited 1 from inside an import)."""
    out = run([sys.executable, "-m", "workers.cli", "settings"], {"INGEST_INTERVAL_SEC": "-5"})
    assert out.returncode == 2, out.stderr
    assert "bcfy: cannot start:" in out.stderr
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
    from workers.core.settings import env_fields

    documented = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            documented[name] = value
    defaults = load_settings({}).describe()
    for _, f in env_fields():
        name = f.metadata["env"]
        assert name in documented, f"{name} is missing from .env.example"
        assert documented[name] == defaults[name], f"{name}: .env.example disagrees with default"
    assert load_settings(documented) == load_settings({})


# --- secrets in URLs and addresses (issue 10, items 4 and 5) --------------------------------

PASSWORD = "S3CR3T-db-pw-7f3a"


def _refusal(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    return str(err.value)


@pytest.mark.parametrize("escape", ["%ZZ", "%", "%4", "%00", "%g1"])
def test_a_database_url_libpq_cannot_read_is_refused_without_its_password(escape):
    message = _refusal({"DATABASE_URL": f"postgresql://app:{PASSWORD}{escape}@db:5432/bcfy"})
    assert "DATABASE_URL" in message
    assert PASSWORD not in message and "7f3a" not in message


@settings(max_examples=300, deadline=None)
@given(
    user=st.text(max_size=12),
    password=st.text(max_size=16),
    rest=st.sampled_from(["", "/bcfy", "/bcfy?sslmode=require", "/bcfy?foo=bar", ":5432/x"]),
)
def test_any_database_url_is_either_readable_by_libpq_or_refused_without_its_secret(
    user: str, password: str, rest: str
):
    """Whatever DATABASE_URL holds, libpq never gets to echo it: either it passes validation
    and libpq parses it, or validation refuses it with a message that does not show it."""
    secret = f"PW{password}"
    raw = f"postgresql://{user}:{secret}@db{rest}"
    try:
        s = load_settings({"DATABASE_URL": raw})
    except SettingsError as exc:
        assert "DATABASE_URL" in str(exc)
        assert secret not in str(exc) and quote(secret) not in str(exc)
        return
    conninfo_to_dict(s.services.database_url.reveal())  # raises if libpq cannot read it
    assert secret not in str(s.describe())


def test_a_percent_encoded_password_is_accepted():
    url = f"postgresql://app:{quote('p%w@d /x', safe='')}@db/bcfy"
    s = load_settings({"DATABASE_URL": url})
    assert conninfo_to_dict(s.services.database_url.reveal())["password"] == "p%w@d /x"


@pytest.mark.parametrize("name", ["BCFY_API_BASE", "TRANSCRIBE_OPENAI_BASE_URL"])
def test_base_urls_with_credentials_are_refused_without_echoing_them(name):
    message = _refusal({name: f"https://user:{PASSWORD}@api.example.com/v1"})
    assert name in message and PASSWORD not in message
    message = _refusal({name: f"https://{PASSWORD}@api.example.com/v1"})
    assert name in message and PASSWORD not in message


def test_a_setting_error_never_echoes_a_password_from_any_url():
    message = _refusal({"BCFY_API_BASE": f"ftp://user:{PASSWORD}@api.example.com"})
    assert "BCFY_API_BASE" in message and PASSWORD not in message


def test_the_api_over_plain_http_is_refused_unless_loopback_or_allowed():
    message = _refusal({"BCFY_API_BASE": "http://api.bcfy.io"})
    assert "BCFY_API_BASE" in message and "BCFY_ALLOW_INSECURE_HTTP" in message
    for base in ("http://127.0.0.1:8089", "http://localhost:8089", "http://[::1]:8089"):
        assert load_settings({"BCFY_API_BASE": base}).broadcastify.api_base == base
    allowed = {"BCFY_API_BASE": "http://api.internal", "BCFY_ALLOW_INSECURE_HTTP": "true"}
    assert load_settings(allowed).broadcastify.api_base == "http://api.internal"


def test_network_endpoints_listen_on_loopback_by_default():
    s = load_settings({})
    assert (
        s.operations.metrics_address == "127.0.0.1" and s.operations.flower_address == "127.0.0.1"
    )
    assert _refusal({"METRICS_ADDRESS": "not an address!"}).count("METRICS_ADDRESS") == 1


def test_every_variable_belongs_to_one_stage_group():
    from workers.core.settings import GROUPS, env_fields

    names = [f.metadata["env"] for _, f in env_fields()]
    assert len(names) == len(set(names)) == len(load_settings({}).describe())
    assert {group for group, _ in env_fields()} == set(GROUPS)
    s = load_settings(
        {
            "AUDIO_LEASE_SEC": "90",
            "BCFY_API_KEY": "k",
            "TRANSCRIBE_BACKEND": "openai",
            "TRANSCRIBE_OPENAI_API_KEY": "o",
        }
    )
    assert (s.audio.lease_sec, s.broadcastify.api_key.reveal()) == (90, "k")
    assert s.transcription.backend == "openai" and s.value("AUDIO_LEASE_SEC") == 90


def test_with_values_replaces_settings_by_variable_name():
    s = load_settings({})
    changed = s.with_values(AUDIO_LEASE_SEC=0.3, JOB_MISFIRE_GRACE_SEC=5.0)
    assert (changed.audio.lease_sec, changed.jobs.misfire_grace_sec) == (0.3, 5.0)
    assert changed.audio.max_attempts == s.audio.max_attempts and changed.ingest == s.ingest
    assert s.audio.lease_sec == 120  # the original is unchanged (frozen)
    with pytest.raises(KeyError, match="AUDIO_LEASE is not a setting"):
        s.with_values(AUDIO_LEASE=1)
