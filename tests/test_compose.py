"""compose.yaml: valid for a real compose binary, and shaped as the deployment needs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.procs import ROOT
from workers.processes import worker_argv
from workers.settings import load_settings

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = [
    "redis",
    "postgres",
    "beat",
    "worker-ingest",
    "worker-audio",
    "worker-transcription",
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
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
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
    for queue in ("ingest", "audio", "transcription"):
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
