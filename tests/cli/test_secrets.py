"""No secret ever shows: a whole `bcfy run` against the simulator with distinctive secrets
(database and Redis passwords, the API key, the user's password, Flower's login, the
transcription key), then every log, every row of the database, the operator's commands and the
metrics page are searched for each of them, as written and percent-encoded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import Services
from tests.support.procs import operator_env, start_bcfy, transcribed_so_far
from workers.core.rows import one_row
from workers.dev.procs import run_cli, wait_until
from workers.dev.services import free_port
from workers.dev.simulator import FeedSimulator

pytestmark = pytest.mark.slow

SECRETS = {
    "DATABASE_URL password": "S3CR3T-db-pw-7f3a",
    "REDIS_URL password": "S3CR3T-redis-pw-7f3a",
    "BCFY_API_KEY": "S3CR3T-api-key-7f3a",
    "BCFY_PASSWORD": "S3CR3T-user-pw-7f3a!",
    "FLOWER_BASIC_AUTH password": "S3CR3T-flower-pw-7f3a",
    "TRANSCRIBE_OPENAI_API_KEY": "S3CR3T-openai-7f3a",
}
KEY_ID, APP_ID, USER = "kid-secrets", "app-secrets", "secret-tester"


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), secret.replace("-", "%2D")}


def leaks(where: str, text: str) -> list[str]:
    return [
        f"{name} ({form!r}) in {where}"
        for name, secret in SECRETS.items()
        for form in forms(secret)
        if form in text
    ]


@pytest.fixture
def secret_env(clean: Services, tmp_path: Path) -> Iterator[tuple[dict[str, str], FeedSimulator]]:
    name = f"bcfy_secrets_{uuid.uuid4().hex[:8]}"
    admin = urlsplit(clean.admin_dsn)
    host = admin.netloc.rsplit("@", 1)[-1]
    user = admin.username or "postgres"
    # Local PostgreSQL trusts its clients: the password is carried everywhere, never checked.
    db_url = urlunsplit(
        admin._replace(netloc=f"{user}:{SECRETS['DATABASE_URL password']}@{host}", path=f"/{name}")
    )
    # Redis's default user has no password here, so any password authenticates as it.
    redis = urlsplit(clean.redis_url)
    redis_url = urlunsplit(
        redis._replace(netloc=f"default:{SECRETS['REDIS_URL password']}@{redis.netloc}")
    )
    sim = FeedSimulator(
        {KEY_ID: (SECRETS["BCFY_API_KEY"], APP_ID)},
        users={USER: (SECRETS["BCFY_PASSWORD"], 4242)},
        seed=11,
    ).start()
    env = operator_env(
        clean,
        tmp_path,
        **sim.pipeline_env(),
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        BCFY_USERNAME=USER,
        BCFY_PASSWORD=SECRETS["BCFY_PASSWORD"],
        FLOWER_BASIC_AUTH=f"ops:{SECRETS['FLOWER_BASIC_AUTH password']}",
        TRANSCRIBE_OPENAI_API_KEY=SECRETS["TRANSCRIBE_OPENAI_API_KEY"],
        LOG_LEVEL="DEBUG",
        BCFY_TEST_MARKER=f"secrets-{uuid.uuid4().hex}",
    )
    assert env["BCFY_API_KEY"] == SECRETS["BCFY_API_KEY"]
    try:
        yield env, sim
    finally:
        sim.stop()
        with psycopg.connect(clean.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _marked(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


def test_a_full_run_shows_no_secret_anywhere(secret_env, clean: Services, tmp_path: Path):
    env, sim = secret_env
    public = sim.add_playlist(name="Public secrets playlist", calls_per_minute=6)
    private = sim.add_playlist(name="Private secrets playlist", public=False, calls_per_minute=6)
    for playlist in (public, private):
        for _ in range(2):
            sim.publish_call(playlist)
    assert run_cli("migrate", env=env).returncode == 0
    for playlist in (public, private):
        added = run_cli("playlists", "add", playlist, env=env)
        assert added.returncode == 0, added.stdout + added.stderr

    flower_port, metrics_port = free_port(), free_port()
    out_path = tmp_path / "run.out"
    run = start_bcfy(
        "run", "--flower-port", str(flower_port), env=env, out=out_path, new_session=True
    )
    metrics_log = tmp_path / "metrics.out"
    metrics = start_bcfy("metrics", "--port", str(metrics_port), env=env, out=metrics_log)
    outputs: dict[str, str] = {}
    try:
        wait_until(lambda: transcribed_so_far(run, out_path) >= 2, 180, "two transcripts", every=1)
        # Faults the service may throw: their errors are stored and shown.
        sim.faults.malformed_json_next = 1
        sim.faults.error_in_200 = 1
        sim.faults.fail_next_500 = 1
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            failed_polls = "SELECT count(*) FROM bcfy_playlist_poll_log WHERE NOT success"
            wait_until(
                lambda: one_row(conn.execute(failed_polls).fetchone())[0],
                120,
                "a failed poll recorded",
                every=1,
            )
        for args in (
            ("settings",),
            ("status",),
            ("status", "--json"),
            ("playlists", "list"),
            ("search", "the"),
        ):
            done = run_cli(*args, env=env)
            outputs[f"bcfy {' '.join(args)}"] = done.stdout + done.stderr
        page = wait_until(
            lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), 30, "the metrics page"
        )
        outputs["metrics page"] = page
        flower = httpx.get(
            f"http://127.0.0.1:{flower_port}/api/workers",
            auth=("ops", SECRETS["FLOWER_BASIC_AUTH password"]),
            timeout=30,
        )
        assert flower.status_code == 200
    finally:
        metrics.terminate()
        metrics.wait(10)
        run.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(90)
        for pid in [run.pid, *_marked(env["BCFY_TEST_MARKER"])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert "DATABASE_URL=postgresql://" in outputs["bcfy settings"]
    assert "Private secrets playlist" in outputs["bcfy playlists list"]
    assert "bcfy_scrape_ok 1.0" in outputs["metrics page"]
    outputs["bcfy run output"] = out_path.read_text(errors="replace")
    outputs["bcfy metrics output"] = metrics_log.read_text(errors="replace")
    logs = sorted((tmp_path / "state" / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"beat", "worker-ingest", "worker-audio", "flower"}
    for log in logs:
        outputs[f"log {log.name}"] = log.read_text(errors="replace")
    # Every row of every table: error columns, poll log, quarantine, job runs, raw records.
    dump = subprocess.run(
        [
            "pg_dump",
            "--data-only",
            "--dbname",
            clean.admin_dsn.rsplit("/", 1)[0]
            + "/"
            + urlsplit(env["DATABASE_URL"]).path.lstrip("/"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, dump.stderr
    outputs["database"] = dump.stdout
    assert "poll" in dump.stdout

    found = [leak for where, text in outputs.items() for leak in leaks(where, text)]
    print(f"\nsearched {len(outputs)} outputs, {sum(map(len, outputs.values()))} characters")
    assert found == []


def _get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=30).text
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize(
    "bad",
    [
        {"DATABASE_URL": "postgresql://app:{db}%ZZ@127.0.0.1:1/bcfy"},
        {"DATABASE_URL": "postgresql://app:{db}/x@127.0.0.1:1/bcfy"},
        {"TRANSCRIBE_OPENAI_BASE_URL": "https://user:{key}@127.0.0.1:1/v1"},
        {"BCFY_API_BASE": "https://{key}@127.0.0.1:1"},
    ],
)
def test_operator_commands_never_print_a_secret_from_a_bad_url(clean: Services, bad):
    db, key = SECRETS["DATABASE_URL password"], SECRETS["BCFY_API_KEY"]
    env = {
        "DATABASE_URL": clean.database_url,
        "REDIS_URL": clean.redis_url,
        **{k: v.format(db=db, key=key) for k, v in bad.items()},
    }
    for args in (("settings",), ("status",), ("playlists", "list")):
        done = run_cli(*args, env=env)
        assert leaks(f"bcfy {' '.join(args)}", done.stdout + done.stderr) == []
        assert done.returncode != 0 and next(iter(bad)) in done.stderr
