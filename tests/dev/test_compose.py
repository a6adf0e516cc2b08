"""compose.yaml: valid for a real compose binary, and shaped as the deployment needs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from beat_schedule import QUEUES
from workers.core.processes import worker_argv
from workers.core.settings import load_settings
from workers.dev.procs import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = [
    "redis",
    "postgres",
    "beat",
    "worker-ingest",
    "worker-audio",
    "worker-transcription",
    "worker-notify",
    "flower",
]


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_a_compose_binary_accepts_the_file(tmp_path: Path):
    command = compose_command()
    if command is None:
        pytest.skip("no compose binary here (.ci/run installs Debian's docker-compose)")
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    example = (ROOT / ".env.example").read_text()
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        example = example.replace(f"\n{name}=\n", f"\n{name}=pw7f3a\n")
    (tmp_path / ".env").write_text(example.replace("FLOWER_BASIC_AUTH=", "FLOWER_BASIC_AUTH=a:b"))
    out = subprocess.run(
        [*command, "-f", "compose.yaml", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(LONG_RUNNING) | {"migrate"} <= set(resolved["services"])


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy():
    for name in LONG_RUNNING:
        service = SERVICES[name]
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") in ("unless-stopped", "always"), name
    assert SERVICES["migrate"]["restart"] == "no"


def test_the_pipeline_waits_for_a_successful_migration_and_healthy_servers():
    for name in [
        "beat",
        "worker-ingest",
        "worker-audio",
        "worker-transcription",
        "worker-notify",
        "worker-notify",
        "flower",
        "metrics",
    ]:
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_exactly_one_beat_and_one_pool_per_queue():
    assert [n for n, s in SERVICES.items() if "beat" in s.get("command", [])] == ["beat"]
    assert "deploy" not in SERVICES["beat"] and "scale" not in SERVICES["beat"]
    for queue in QUEUES:
        service = SERVICES[f"worker-{queue}"]
        assert service["command"] == ["bcfy", "worker", queue]
        # Workers get time to finish running work when stopped (warm shutdown).
        assert service["stop_signal"] == "SIGTERM"
        assert service["stop_grace_period"] in ("5m", "300s")
        argv = worker_argv(queue, load_settings({}))
        assert argv[argv.index("--queues") + 1] == queue


def test_data_lives_in_volumes():
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert {"pgdata", "redis", "audio"} <= set(COMPOSE["volumes"])
    for queue in ("audio", "transcription"):
        assert any(v.startswith("audio:") for v in SERVICES[f"worker-{queue}"]["volumes"])


def test_the_workers_store_audio_on_the_audio_volume():
    # .env (from .env.example) says AUDIO_STORE_DIR=var/audio, for `make run`: compose's own
    # environment must win, or the workers write under the image's working directory, which the
    # service user cannot write, and the volume stays empty (issue 14).
    for queue in ("ingest", "audio", "transcription"):
        service = SERVICES[f"worker-{queue}"]
        mounts = dict(v.split(":", 1)[::-1] for v in service["volumes"])
        assert mounts[service["environment"]["AUDIO_STORE_DIR"]] == "audio", queue
        assert service["env_file"] == ".env"  # environment wins over env_file


def test_make_deploy_replaces_every_service_built_from_the_image():
    # A service missing from the loop would keep running the old release after `make deploy`.
    loop = re.search(r"for svc in ([^;]+); do", (ROOT / "Makefile").read_text())
    assert loop is not None
    built = {n for n, s in SERVICES.items() if "build" in s and s.get("restart") != "no"}
    assert set(loop.group(1).split()) == built


def test_no_service_runs_as_root():
    # The Python services run as the image's user; redis:7-alpine drops to its user only when
    # its command is redis-server (here: sh, to write the password into a config file).
    assert SERVICES["redis"]["user"] == "redis"
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert [ln for ln in dockerfile if ln.startswith("USER ")][-1] == "USER bcfy"


# --- nothing exposed, no secret where it is not needed (issue 10, item 4) ---------------------

SECRETS_ENV = {
    "POSTGRES_PASSWORD": "pgpw7f3a",
    "REDIS_PASSWORD": "redispw7f3a",
    "FLOWER_BASIC_AUTH": "ops:flowerpw7f3a",
    "BCFY_API_KEY": "apikey7f3a",
    "BCFY_PASSWORD": "bcfypw7f3a",
    "TRANSCRIBE_OPENAI_API_KEY": "openai7f3a",
}
KEYS = ("BCFY_API_KEY", "BCFY_PASSWORD", "TRANSCRIBE_OPENAI_API_KEY")


def test_published_ports_are_on_the_hosts_loopback_only():
    published = {n: s["ports"] for n, s in SERVICES.items() if s.get("ports")}
    assert set(published) == {"flower", "metrics"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    # Inside its container each listens on all interfaces, or the published port would not
    # reach it; Flower still needs its login there.
    assert SERVICES["flower"]["environment"]["FLOWER_ADDRESS"] == "0.0.0.0"
    assert SERVICES["metrics"]["environment"]["METRICS_ADDRESS"] == "0.0.0.0"
    assert "FLOWER_BASIC_AUTH:?" in SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_redis_and_postgres_require_passwords_from_the_environment():
    redis = SERVICES["redis"]
    assert "requirepass" in " ".join(redis["command"])
    assert "REDIS_PASSWORD" not in " ".join(redis["command"]).replace("$$REDIS_PASSWORD", "")
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")  # healthcheck
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    for name, service in SERVICES.items():
        env = service.get("environment", {})
        if "REDIS_URL" in env:
            assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name
        if "DATABASE_URL" in env:
            assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"], name
    example = (ROOT / ".env.example").read_text()
    assert "\nPOSTGRES_PASSWORD=" in example and "\nREDIS_PASSWORD=" in example


def test_flower_and_metrics_get_no_broadcastify_or_transcription_keys():
    for name in ("flower", "metrics"):
        service = SERVICES[name]
        assert "env_file" not in service, f"{name} gets every secret of .env"
        for key in KEYS:
            assert key not in service.get("environment", {}), (name, key)
    assert "FLOWER_BASIC_AUTH" not in SERVICES["metrics"]["environment"]


def _config(tmp_path: Path, env_text: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no compose binary here (.ci/run installs Debian's docker-compose)")
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    (tmp_path / ".env").write_text(env_text)
    return subprocess.run(
        [*command, "-f", "compose.yaml", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in SECRETS_ENV},
    )


def test_compose_resolves_secrets_only_where_they_are_needed(tmp_path: Path):
    example = (ROOT / ".env.example").read_text()
    filled = "\n".join(
        f"{line.split('=')[0]}={SECRETS_ENV[line.split('=')[0]]}"
        if line.split("=")[0] in SECRETS_ENV
        else line
        for line in example.splitlines()
    )
    out = _config(tmp_path, filled)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("flower", "metrics"):
        env = services[name]["environment"]
        shown = str(services[name])
        for key in KEYS:
            assert SECRETS_ENV[key] not in shown, (name, key)
        assert env["REDIS_URL"] == "redis://:redispw7f3a@redis:6379/0"
        assert env["DATABASE_URL"] == "postgresql://bcfy:pgpw7f3a@postgres:5432/bcfy"
        assert all(
            str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1")
            for p in services[name]["ports"]
        ), services[name]["ports"]
    assert services["worker-ingest"]["environment"]["BCFY_API_KEY"] == "apikey7f3a"
    assert "flowerpw7f3a" not in str(services["metrics"])

    for missing in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        without = "\n".join(ln for ln in filled.splitlines() if not ln.startswith(missing))
        out = _config(tmp_path, without)
        assert out.returncode != 0 and f"set {missing} in .env" in out.stderr, out.stderr
