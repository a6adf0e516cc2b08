"""Running and operating it as a newcomer and an operator would: `bcfy run` in demo mode until
transcripts appear, `bcfy status`, the metrics endpoint and Flower while it runs, then Ctrl-C
and nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import Services
from tests.support.procs import listening_addresses, operator_env, start_bcfy, transcribed_so_far
from workers.core.rows import one_row
from workers.dev.procs import ROOT, run_cli, wait_until
from workers.dev.services import free_port

pytestmark = pytest.mark.slow

# `bcfy run` starts a pool per queue: the three stages and the alerts' deliveries.
POOLS = ("ingest", "audio", "transcription", "notify")


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries the marker (all of `bcfy run`'s children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def run_env(clean: Services, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A database of its own (bcfy run creates and migrates it), the session's Redis index."""
    name = f"bcfy_run_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(clean.admin_dsn)._replace(path=f"/{name}"))
    env = operator_env(
        clean, tmp_path, DATABASE_URL=url, BCFY_TEST_MARKER=f"run-{uuid.uuid4().hex}"
    )
    yield env
    with psycopg.connect(clean.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_make_run_demo_reaches_transcripts_and_stops_cleanly(run_env, tmp_path):
    flower_port, metrics_port = free_port(), free_port()
    out_path = tmp_path / "run.out"
    run = start_bcfy(
        "run", "--flower-port", str(flower_port), env=run_env, out=out_path, new_session=True
    )
    metrics = start_bcfy(
        "metrics", "--port", str(metrics_port), "--address", "127.0.0.1", env=run_env
    )
    started = time.monotonic()
    try:
        # A deadline for the event, not the README's "about 15 s": a speed, not checked here.
        wait_until(
            lambda: transcribed_so_far(run, out_path),
            240,
            "a transcript after `bcfy run` started",
            every=1,
        )
        took = time.monotonic() - started
        output = out_path.read_text()
        assert "demo mode: feed simulator" in output and "following " in output
        # New transcripts are shown as they land: "  HH:MM:SS <playlist> / <group>: <text>".
        assert any(
            ln.startswith("  ") and " / " in ln and ": " in ln
            for ln in output.splitlines()
            if "Demo playlist" in ln
        )
        print(f"\nfirst transcript {took:.0f}s after `bcfy run` started")

        # The operator's view while it runs. A worker answers `bcfy status` within its 1 s
        # wait when it is not starved of CPU: on a loaded machine, ask again until every pool
        # has answered.
        def every_pool_answers() -> dict | None:
            status = run_cli("status", "--json", env=run_env)
            assert status.returncode == 0, status.stdout + status.stderr
            snap: dict = json.loads(status.stdout)
            return snap if all(snap["workers"][q] for q in POOLS) else None

        snap = wait_until(every_pool_answers, 120, "every pool online in `bcfy status`", every=1)
        assert snap["stages"]["ingest"]["done"]["5m"] >= 1
        assert snap["stages"]["transcription"]["done"]["5m"] >= 1
        assert len(snap["playlists"]) == 2
        assert all(p["last_poll_ok"] and p["cursor"] for p in snap["playlists"])
        for queue in POOLS:
            assert snap["workers"][queue], f"no {queue} worker online: {snap['workers']}"
        assert snap["jobs"]["tasks.ingest.poll_followed_playlists"]["last_outcome"] in (
            "ok",
            "skipped",
        )
        text = run_cli("status", env=run_env).stdout
        assert "transcription" in text and "Demo playlist 1" in text and "workers online" in text

        scrape = wait_until(
            lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), 10, "the metrics endpoint"
        )
        assert 'bcfy_stage_done_total{stage="transcription"}' in scrape
        assert 'bcfy_workers_online{queue="audio"} 1.0' in scrape
        assert "bcfy_scrape_ok 1.0" in scrape
        assert 'bcfy_call_to_transcript_seconds{quantile="0.95",recognition="excluded"' in scrape

        # Flower shows the four pools (demo mode: no login).
        workers = httpx.get(
            f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", timeout=20
        ).json()
        assert {name.split("@")[0] for name in workers} == set(POOLS)
        flower_metrics = httpx.get(f"http://127.0.0.1:{flower_port}/metrics", timeout=10).text
        assert "flower_events_total" in flower_metrics, "Flower's task metrics"
    finally:
        metrics.terminate()
        metrics.wait(10)
        run.send_signal(signal.SIGINT)  # Ctrl-C
        code: int | None
        try:
            code = run.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        left_behind = processes_with(run_env["BCFY_TEST_MARKER"])
        # Whatever happened, leave nothing running to take later tests' messages.
        for pid in [run.pid, *left_behind]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    output = out_path.read_text()
    assert code == 0, output[-3000:]
    assert output.rstrip().endswith("stopped.")
    assert left_behind == [], "orphan processes left behind"
    # Stopping lost or broke nothing: no call failed, none has two transcripts, and a call cut
    # short is still in the work queue (pending or leased), to be done on the next start.
    with psycopg.connect(run_env["DATABASE_URL"]) as conn:
        audio: dict[str, int] = dict(
            conn.execute("SELECT state, count(*) FROM call_audio GROUP BY 1").fetchall()
        )
        (doubled,) = one_row(
            conn.execute(
                "SELECT count(*) FROM (SELECT call_id FROM transcripts GROUP BY 1"
                " HAVING count(*) > 1) d"
            ).fetchone()
        )
        (untracked,) = one_row(
            conn.execute(
                "SELECT count(*) FROM bcfy_calls_raw c"
                " WHERE NOT EXISTS (SELECT 1 FROM call_audio a WHERE a.call_id = c.id)"
            ).fetchone()
        )
    assert "failed" not in audio and audio.get("ready", 0) >= 1, audio
    assert doubled == 0 and untracked == 0


def _get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None


def test_flower_refuses_to_start_without_a_login_outside_demo_mode(run_env):
    env = {**run_env, "BCFY_DEMO": "false"}
    env.pop("FLOWER_BASIC_AUTH", None)
    out = run_cli("flower", "--port", str(free_port()), env=env)
    assert out.returncode == 2
    assert "FLOWER_BASIC_AUTH" in out.stderr


@pytest.mark.parametrize(
    ("values", "args"),
    [
        ({"FLOWER_ADDRESS": "0.0.0.0"}, []),
        ({}, ["--address=0.0.0.0"]),
        ({}, ["--address", "::"]),
        ({"FLOWER_ADDRESS": "192.0.2.1"}, []),
    ],
)
def test_flower_never_runs_without_a_login_off_loopback_even_in_demo_mode(run_env, values, args):
    env = {**run_env, "BCFY_DEMO": "true", **values}
    env.pop("FLOWER_BASIC_AUTH", None)
    try:
        out = run_cli("flower", "--port", str(free_port()), *args, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("Flower started with no login on a public address") from None
    assert out.returncode == 2
    assert "FLOWER_BASIC_AUTH" in out.stderr


def test_flower_asks_for_its_login(run_env, tmp_path):
    port = free_port()
    env = {**run_env, "FLOWER_BASIC_AUTH": "ops:s3cret-pass"}
    run_cli("migrate", env=env)
    flower = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: _get(url) is not None, 30, "Flower to answer")
        assert listening_addresses(port) == {"127.0.0.1"}, "loopback unless FLOWER_ADDRESS"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, auth=("ops", "wrong"), timeout=10).status_code == 401
        assert httpx.get(url, auth=("ops", "s3cret-pass"), timeout=10).status_code == 200
        healthy = run_cli("healthcheck", "flower", str(port), env=env)
        assert healthy.returncode == 0, healthy.stdout
    finally:
        flower.terminate()
        output = flower.communicate(timeout=20)[0].decode(errors="replace")
    assert "s3cret-pass" not in output


def test_status_says_what_is_unreachable_and_shows_the_rest(run_env):
    env = {**run_env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    out = run_cli("status", "--json", env=env)
    assert out.returncode == 1
    snap = json.loads(out.stdout)
    assert any(p.startswith("database unavailable") for p in snap["problems"])
    assert set(snap["queues"]) == set(POOLS)
