"""`bcfy run`: the whole pipeline on one machine, for trying it out and for development.

Reuses Redis and PostgreSQL when DATABASE_URL / REDIS_URL (or the standard local ports) answer,
else starts throwaway servers from the installed binaries (their data under BCFY_STATE_DIR).
Then migrates, starts beat, the three worker pools and Flower, prints where to look and a
progress line, and on Ctrl-C stops everything: each process gets SIGTERM (Celery's warm
shutdown lets running work finish), then anything left is killed, servers last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from workers.devservices import (
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_reachable,
    redis_reachable,
)
from workers.migrate import ensure_database, migrate
from workers.processes import beat_argv, flower_argv, worker_argv
from workers.settings import Settings, redact_url

STOP_GRACE_SEC = 30


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Supervisor:
    settings: Settings
    flower_port: int = 5555
    children: list[Child] = field(default_factory=list)
    servers: list[ThrowawayRedis | ThrowawayPostgres] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def state(self) -> Path:
        return Path(self.settings.state_dir).resolve()

    def ensure_services(self) -> None:
        redis_url = self.settings.redis_url.reveal()
        if not redis_reachable(redis_url):
            print(f"Redis at {redact_url(redis_url)} is not answering: starting one")
            server = ThrowawayRedis().start()
            self.servers.append(server)
            redis_url = server.url
        db_url = self.settings.database_url.reveal()
        server_dsn = psycopg.conninfo.make_conninfo(db_url, dbname="postgres")
        if not postgres_reachable(server_dsn):
            print(f"PostgreSQL at {redact_url(db_url)} is not answering: starting one")
            pg = ThrowawayPostgres().start()
            self.servers.append(pg)
            db_url = pg.dsn.rsplit("/", 1)[0] + "/bcfy"
        self.env |= {"REDIS_URL": redis_url, "DATABASE_URL": db_url}
        if ensure_database(db_url):
            print("created the database")
        migrate(db_url, say=lambda line: print(f"migrate: {line}"))

    def start(self, name: str, argv: list[str]) -> None:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        self.children.append(Child(name, popen, log_path))

    def start_pipeline(self) -> None:
        s = self.settings
        self.start("worker-ingest", worker_argv("ingest", s))
        self.start("worker-audio", worker_argv("audio", s))
        self.start("worker-transcription", worker_argv("transcription", s))
        self.start("beat", beat_argv(s, ["--schedule", str(self.state / "celerybeat-schedule")]))
        self.start("flower", flower_argv(s, self.flower_port))

    def progress(self) -> str:
        try:
            with psycopg.connect(self.env["DATABASE_URL"], connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT outcome, count(*) FROM job_runs"
                    " WHERE started_at > now() - interval '5 minutes' GROUP BY 1"
                ).fetchall()
        except psycopg.Error as exc:
            return f"(database unavailable: {exc.__class__.__name__})"
        counts = dict(rows)
        return "job runs in the last 5 min: " + ", ".join(
            f"{k} {counts.get(k, 0)}" for k in ("ok", "error", "skipped", "lost_lock")
        )

    def watch(self) -> None:
        while True:
            for child in self.children:
                code = child.popen.poll()
                if code is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {code}; see {child.log_path}"
                    )
            print(time.strftime("%H:%M:%S"), self.progress(), flush=True)
            time.sleep(5)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SEC
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.1, deadline - time.monotonic()))
        for child in self.children:
            # Whatever is left of the group (pool children included) is killed.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5)
        for server in reversed(self.servers):
            server.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, flower_port: int = 5555) -> int:
    sup = Supervisor(settings, flower_port=flower_port)
    # SIGTERM (e.g. from a terminal closing) stops us like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sup.ensure_services()
        sup.start_pipeline()
        print(
            f"\npipeline running. Flower: http://127.0.0.1:{flower_port}   "
            f"logs: {sup.state / 'logs'}\nCtrl-C stops everything.\n",
            flush=True,
        )
        sup.watch()
    except KeyboardInterrupt:
        print("\nstopping (running work finishes first)...", flush=True)
        return_code = 0
    except Exception as exc:
        print(f"bcfy run: {exc}", file=sys.stderr)
        return_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan children
        sup.stop()
        print("stopped.")
    return return_code
