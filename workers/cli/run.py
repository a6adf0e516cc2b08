"""`bcfy run` (`make run`): the whole pipeline on one machine, to try it and to develop on.

1. Redis and PostgreSQL: reused when DATABASE_URL / REDIS_URL answer, else started from the
   installed binaries (throwaway servers, gone when we stop).
2. The database is created if missing and migrated.
3. Demo mode unless Broadcastify credentials are set (BCFY_API_KEY_ID, BCFY_API_KEY,
   BCFY_APP_ID): the feed simulator runs in this process with demo playlists, which are
   followed through `bcfy playlists add` like real ones.
4. Beat, the four worker pools (ingest, audio, transcription, notify) and Flower start as
   child processes, logging to BCFY_STATE_DIR/logs; every few seconds a progress line, and
   each new transcript as it lands.
5. Ctrl-C (or SIGTERM) stops everything: each child gets SIGTERM, so Celery's warm shutdown
   finishes running work (a call cut short is handed back by its lease); what is left after the
   grace period is killed, the whole process group, so no orphan survives. Servers stop last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg.rows import TupleRow

from workers.cli import status
from workers.core.children import die_with_parent
from workers.core.migrate import ensure_database, migrate
from workers.core.processes import beat_argv, flower_argv, worker_argv
from workers.core.settings import Settings, redact_url
from workers.core.text import terminal_safe
from workers.dev.services import (
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
    postgres_reachable,
    redis_reachable,
)

if TYPE_CHECKING:
    from workers.dev.simulator import FeedSimulator

STOP_GRACE_SEC = 30
PROGRESS_EVERY_SEC = 5.0
DEMO_PLAYLISTS = 2
DEMO_CALLS_PER_MINUTE = 6.0  # per playlist: enough to watch, light enough for two cores
DEMO_BACKLOG_CALLS = 3  # per playlist, published before the first poll: transcripts come quickly
# Fixed, so that a second `make run` on the same database follows the same demo playlists
# (their cursors carry on) instead of adding new ones beside playlists that no longer exist.
DEMO_PLAYLIST_UUIDS = [
    str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"bcfy-demo-playlist-{n}"))
    for n in range(1, DEMO_PLAYLISTS + 1)
]


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
    simulator: FeedSimulator | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    last_transcript_id: int = 0

    @property
    def state(self) -> Path:
        return Path(self.settings.services.state_dir).resolve()

    @property
    def demo(self) -> bool:
        s = self.settings
        return not (s.broadcastify.api_key_id and s.broadcastify.api_key and s.broadcastify.app_id)

    # --- set-up ---------------------------------------------------------------------------

    def ensure_services(self) -> None:
        redis_url = self.settings.services.redis_url.reveal()
        if not redis_reachable(redis_url):
            print(f"Redis at {redact_url(redis_url)} is not answering: starting one")
            server = ThrowawayRedis().start()
            self.servers.append(server)
            redis_url = server.url
        db_url = self.settings.services.database_url.reveal()
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

    def start_simulator(self) -> list[str]:
        """Demo mode: the feed simulator, its credentials and audio host in the children's env."""
        from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator

        sim = self.simulator = FeedSimulator(DEMO_API_KEYS, seed=int(time.time())).start()
        for n, uuid in enumerate(DEMO_PLAYLIST_UUIDS, start=1):
            sim.add_playlist(
                uuid, name=f"Demo playlist {n}", calls_per_minute=DEMO_CALLS_PER_MINUTE
            )
            for _ in range(DEMO_BACKLOG_CALLS):
                sim.publish_call(uuid)
        self.env |= {"BCFY_DEMO": "true", **sim.pipeline_env()}
        print(
            f"demo mode: feed simulator on {sim.url} with {DEMO_PLAYLISTS} playlists, "
            f"{DEMO_CALLS_PER_MINUTE:g} calls a minute each"
        )
        return DEMO_PLAYLIST_UUIDS

    def follow(self, uuids: list[str]) -> None:
        for uuid in uuids:
            self.run_cli(["playlists", "add", uuid])

    def pause_demo_playlists(self) -> None:
        """The real service does not know the demo playlists: stop polling them, if followed."""
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            paused = conn.execute(
                "UPDATE bcfy_playlists SET sync = false WHERE uuid = ANY(%s::uuid[]) AND sync"
                " RETURNING uuid::text",
                (DEMO_PLAYLIST_UUIDS,),
            ).fetchall()
        for (uuid,) in paused:
            print(f"  demo playlist {uuid} paused (bcfy playlists remove {uuid} to drop it)")

    def run_cli(self, args: list[str]) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"bcfy {' '.join(args)} failed: {out.stderr.strip()}")
        for line in out.stdout.strip().splitlines():
            print(f"  {line}")

    def start(self, name: str, argv: list[str]) -> None:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                preexec_fn=die_with_parent,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        self.children.append(Child(name, popen, log_path))

    def start_pipeline(self) -> bool:
        """Starts everything; returns whether Flower was started."""
        s = self.settings
        self.start("worker-ingest", worker_argv("ingest", s))
        self.start("worker-audio", worker_argv("audio", s))
        self.start("worker-transcription", worker_argv("transcription", s))
        self.start("worker-notify", worker_argv("notify", s))
        self.start("beat", beat_argv(s, ["--schedule", str(self.state / "celerybeat-schedule")]))
        if not (self.demo or s.operations.flower_basic_auth):
            print("Flower not started: set FLOWER_BASIC_AUTH=user:password to run it")
            return False
        if self.demo:
            # Demo mode has no login; Flower's API then needs this, and listens on loopback only.
            self.env["FLOWER_UNAUTHENTICATED_API"] = "true"
        self.start("flower", flower_argv(s, self.flower_port, ["--address=127.0.0.1"]))
        return True

    # --- watching -------------------------------------------------------------------------

    def progress(self, conn: psycopg.Connection[TupleRow]) -> str:
        t = status.totals(conn)
        audio_failed, asr_failed = t["audio"]["failed"], t["transcription"]["failed"]
        return (
            f"calls ingested {t['ingest']['done']}, audio ready {t['audio']['done']},"
            f" transcribed {t['transcription']['done']}, failed {audio_failed + asr_failed}"
            f" (audio {audio_failed}, transcription {asr_failed})"
        )

    def new_transcripts(self, conn: psycopg.Connection[TupleRow]) -> list[str]:
        rows = conn.execute(
            "SELECT t.id, c.started_at, coalesce(p.name, c.playlist_uuid::text), c.group_id,"
            "       t.text"
            "  FROM transcripts t JOIN bcfy_calls_raw c ON c.id = t.call_id"
            "  LEFT JOIN bcfy_playlists p ON p.uuid = c.playlist_uuid"
            " WHERE t.id > %s ORDER BY t.id LIMIT 20",
            (self.last_transcript_id,),
        ).fetchall()
        lines = []
        for tid, started, playlist, group, text in rows:
            self.last_transcript_id = max(self.last_transcript_id, tid)
            said = terminal_safe(text) or "(no speech)"
            lines.append(
                f"  {started:%H:%M:%S} {terminal_safe(playlist)} / {terminal_safe(group)}: {said}"
            )
        return lines

    def check_children(self) -> None:
        for child in self.children:
            code = child.popen.poll()
            if code is not None:
                raise RuntimeError(f"{child.name} exited with code {code}; see {child.log_path}")

    def watch(self) -> None:
        last_progress = 0.0
        while True:
            self.check_children()
            try:
                with psycopg.connect(self.env["DATABASE_URL"], connect_timeout=3) as conn:
                    for line in self.new_transcripts(conn):
                        print(line, flush=True)
                    if time.monotonic() - last_progress >= PROGRESS_EVERY_SEC:
                        last_progress = time.monotonic()
                        print(time.strftime("%H:%M:%S"), self.progress(conn), flush=True)
            except psycopg.Error as exc:
                print(f"(database unavailable: {exc.__class__.__name__})", flush=True)
            time.sleep(1)

    # --- stopping -------------------------------------------------------------------------

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
        if self.simulator is not None:
            self.simulator.stop()
        for server in reversed(self.servers):
            server.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, flower_port: int = 5555) -> int:
    sup = Supervisor(settings, flower_port=flower_port or free_port())
    # Ctrl-C and SIGTERM (e.g. a terminal closing) stop everything. Installed explicitly: a
    # process started in the background inherits SIGINT ignored, and Ctrl-C must still work.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    return_code = 0
    try:
        sup.ensure_services()
        if sup.demo:
            sup.follow(sup.start_simulator())
        else:
            print(
                f"using the Broadcastify service at {settings.broadcastify.api_base}"
                " (followed playlists: bcfy playlists list)"
            )
            sup.pause_demo_playlists()
        flower = sup.start_pipeline()
        where = f"Flower: http://127.0.0.1:{sup.flower_port}   " if flower else ""
        print(
            f"\npipeline running. {where}logs: {sup.state / 'logs'}\n"
            'status: bcfy status   search: bcfy search "fire"   Ctrl-C stops everything.\n',
            flush=True,
        )
        sup.watch()
    except KeyboardInterrupt:
        print("\nstopping (running work finishes first)...", flush=True)
    except Exception as exc:
        print(f"bcfy run: {terminal_safe(str(exc))}", file=sys.stderr)
        return_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan children
        sup.stop()
        print("stopped.", flush=True)
    return return_code
