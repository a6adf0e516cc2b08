"""Worker and beat processes of the tests' Celery app (tests.support.jobapp: production's app
plus test jobs), `bcfy` commands started as an operator starts them, and the addresses a process
listens on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

from workers.dev.procs import ROOT, Proc, bcfy_argv, wait_until
from workers.dev.services import Servers

JOBAPP = "tests.support.jobapp"


def celery(args: list[str], app: str = JOBAPP, prefix: Sequence[str] = ()) -> list[str]:
    """`celery -A app ARGS`, run through `prefix` (e.g. `faketime -f +120s`) when given."""
    return [*prefix, sys.executable, "-m", "celery", "-A", app, *args]


def start_worker(
    name: str,
    env: Mapping[str, str],
    logdir: Path,
    *,
    queues: str = "ingest",
    concurrency: int = 1,
    pool: str = "prefork",
    prefix: Sequence[str] = (),
) -> Proc:
    proc = Proc(
        name,
        celery(
            [
                "worker",
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
            ],
            prefix=prefix,
        ),
        env,
        logdir,
    )
    return proc.started("ready.")


def refused_start(
    queue: str, servers: Servers, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`celery -A workers.app worker -Q QUEUE` on the session's servers with only `env` (and
    PATH), run until it exits: a worker whose settings are refused stops at once."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queue],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            "REDIS_URL": servers.redis_url,
            "DATABASE_URL": servers.database_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_beat(
    name: str,
    env: Mapping[str, str],
    logdir: Path,
    app: str = JOBAPP,
    prefix: Sequence[str] = (),
) -> Proc:
    """Beat with the app's schedule: the test jobs of tests.support.jobapp, or production's
    (workers.app, its intervals from env)."""
    schedule = logdir / f"{name}-schedule"
    argv = celery(["beat", "-s", str(schedule), "--loglevel", "INFO"], app, prefix)
    return Proc(name, argv, env, logdir).started("beat: Starting...")


def stale_ticks(
    env: Mapping[str, str], logdir: Path, procs: list[Proc], broker: redis.Redis, at_least: int
) -> int:
    """Beat (its env with a 1 s JOB_MISFIRE_GRACE_SEC) sends ticks with no worker to take them
    until at least `at_least` wait in the ingest queue, then stops; returns how many wait, once
    every one is older than its grace."""
    beat = start_beat("beat", env, logdir)
    procs.append(beat)
    wait_until(lambda: broker.llen("ingest") >= at_least, 60, "ticks to pile up (no worker)")
    beat.stop()
    queued = int(broker.llen("ingest"))
    time.sleep(1.5)  # every queued tick is now older than its grace
    return queued


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    words = [raw[i : i + 4][::-1].hex() for i in range(0, 16, 4)]
                    found.add(":".join("".join(words)[i : i + 4] for i in range(0, 32, 4)))
    return found


# The pipeline's own settings, left out of an operator's environment taken from this process.
PIPELINE_PREFIXES = ("BCFY_", "AUDIO_", "INGEST_", "TRANSCRIBE_", "FLOWER_")


def operator_env(servers: Servers, tmp_path: Path, **values: str) -> dict[str, str]:
    """The environment an operator's shell gives `bcfy run`: this process's, less the pipeline's
    settings, plus the servers, state and audio under tmp_path, a 6 s poll, one transcription
    process, unbuffered output, and `values` (which may replace any of it)."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith(PIPELINE_PREFIXES)}
    return outside | servers.worker_env(
        tmp_path,
        AUDIO_STORE_DIR=str(tmp_path / "audio"),
        INGEST_INTERVAL_SEC="6",
        TRANSCRIPTION_CONCURRENCY="1",
        PYTHONUNBUFFERED="1",
        **values,
    )


def start_bcfy(
    *args: str, env: Mapping[str, str], out: Path | None = None, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """`bcfy ARGS` started with `env`, both output streams written to `out` (or dropped); with
    new_session, in a session (and process group) of its own, as a terminal starts it."""
    with open(out or os.devnull, "wb") as log:
        return subprocess.Popen(
            bcfy_argv(*args),
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def start_metrics(env: Mapping[str, str], logdir: Path, procs: list[Proc], port: int) -> str:
    """`bcfy metrics --port PORT` with `env`, serving (handed to `procs`); returns its URL."""
    proc = Proc("metrics", bcfy_argv("metrics", "--port", str(port)), env, logdir)
    procs.append(proc)
    proc.started("metrics on http://")
    return f"http://127.0.0.1:{port}/metrics"


def transcribed_so_far(run: subprocess.Popen[bytes], out: Path) -> int:
    """How many calls `bcfy run` (output in `out`) says it has transcribed: its last
    "transcribed N, ..." line, 0 before the first; it must still be running."""
    if run.poll() is not None:
        raise AssertionError(out.read_text())
    lines = [ln for ln in out.read_text().splitlines() if "transcribed " in ln]
    return int(lines[-1].split("transcribed ")[1].split(",")[0]) if lines else 0


def pytest_argv(*args: str) -> list[str]:
    """The command line of a pytest run of its own (quiet, no cache), with `args`."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
