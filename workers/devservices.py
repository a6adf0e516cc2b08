"""Redis and PostgreSQL for development and tests: reuse what is reachable, else start throwaway
servers from the installed `redis-server` and PostgreSQL binaries in a temporary directory.

Used by the test suite and by `bcfy run`; never by a deployment, which names its own servers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def postgres_reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


def _postgres_bindir() -> Path:
    """Where initdb and pg_ctl live: PATH, pg_config, or Debian's versioned directories."""
    candidates = []
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("initdb") or "").parent)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    raise ServiceError(
        "PostgreSQL is not reachable and no initdb/pg_ctl was found to start one; "
        "install PostgreSQL or set DATABASE_URL"
    )


@dataclass
class ThrowawayRedis:
    """A redis-server on a free port, keeping nothing on disk."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bcfy-redis-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ThrowawayRedis:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServiceError(
                "Redis is not reachable and redis-server is not installed; set REDIS_URL"
            )
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: redis_reachable(self.url), f"redis-server on port {self.port}", self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory, trust auth, on a free port."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bcfy-pg-")))
    user: str = "postgres"
    started: bool = False

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            # initdb refuses to run as root; run the server as the postgres user.
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> ThrowawayPostgres:
        bindir = _postgres_bindir()
        data = self.workdir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.workdir, self.user)
        else:
            self.user = os.environ.get("USER") or "postgres"
        try:
            self._run(
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                self.user,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            )
            self._run(
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self.workdir / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "start",
            )
        except subprocess.CalledProcessError as exc:
            raise ServiceError(
                f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}"
            ) from exc
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.CalledProcessError, ServiceError):
                self._run(
                    str(_postgres_bindir() / "pg_ctl"),
                    "-D",
                    str(self.workdir / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                )
            self.started = False
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_for(check: object, what: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode}")
        time.sleep(0.05)
    raise ServiceError(f"{what} did not become ready within {timeout:g}s")
