"""Where no Redis, PostgreSQL or S3 server answers, the suite and `bcfy run` start throwaway
ones."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support.procs import pytest_argv
from workers.dev.procs import ROOT
from workers.dev.services import (
    SEAWEEDFS_BUCKET,
    ThrowawayPostgres,
    ThrowawayRedis,
    ThrowawayS3,
    free_port,
    postgres_reachable,
    redis_reachable,
    s3_server,
)


def test_throwaway_servers_start_answer_and_leave_nothing_behind():
    r, pg = ThrowawayRedis().start(), ThrowawayPostgres().start()
    try:
        assert redis_reachable(r.url)
        assert postgres_reachable(pg.dsn)
    finally:
        r.stop()
        pg.stop()
    assert not redis_reachable(r.url)
    assert not postgres_reachable(pg.dsn)
    assert not r.workdir.exists() and not pg.workdir.exists()


def test_the_suite_runs_on_throwaway_servers_when_none_answer():
    env = {**os.environ, "BCFY_TEST_SERVERS": "throwaway"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    out = subprocess.run(
        pytest_argv("tests/core/test_locks.py", "tests/core/test_migrate.py"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_an_index_claimed_by_a_killed_run_is_taken_over(services):
    """A run killed without its clean-up (SIGKILL) leaves its Redis index claimed; the next run
    takes it over instead of losing it, or fifteen such runs would leave none."""
    import socket
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import redis

    from workers.core.identity import worker_identity
    from workers.dev.services import empty_redis_db

    claim_key = f"bcfy:test-claim-{uuid.uuid4().hex}"  # only this test uses it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def client(index: int) -> redis.Redis:
        return redis.Redis.from_url(
            urlunsplit(urlsplit(services.redis_url)._replace(path=f"/{index}"))
        )

    live_owner = worker_identity()
    empty = []
    for index in range(15, 0, -1):
        with client(index) as c:
            if c.dbsize() == 0:
                empty.append(index)
    # The dead run's index must hold nothing of a live run's: it is flushed when taken over.
    assert empty, "no empty Redis database index to play the killed run's"
    stale = empty[-1]
    placed = []
    try:
        for index in range(15, 0, -1):  # every index is claimed: by us, alive, or by the dead
            # The dead run's claim in the form before worker identities were one (host:pid).
            owner = f"{socket.gethostname()}:{dead.pid}" if index == stale else live_owner
            with client(index) as c:
                if c.set(claim_key, owner, nx=True):
                    placed.append(index)
        assert stale in placed
        with client(stale) as c:
            c.set(f"{claim_key}:left-over", "1")
        with empty_redis_db(services.redis_url, claim_key) as url:
            assert urlsplit(url).path == f"/{stale}"
            with client(stale) as c:
                assert c.get(f"{claim_key}:left-over") is None  # flushed before reuse
                assert c.get(claim_key).decode() == live_owner
    finally:
        for index in placed:
            with client(index) as c:
                c.delete(claim_key)


def _bucket_listing(server: ThrowawayS3) -> set[str]:
    """The buckets SeaweedFS's filer lists (an anonymous S3 request is refused either way)."""
    listing = httpx.get(
        f"http://{server.host}:{server.ports['filer']}/buckets/",
        headers={"Accept": "application/json"},
        timeout=5,
    ).json()
    return {e["FullPath"].rsplit("/", 1)[-1] for e in listing.get("Entries") or []}


def test_throwaway_s3_servers_run_side_by_side_and_leave_nothing_behind():
    """Two SeaweedFS servers at once (two test sessions, or a bench beside the suite): each has
    its bucket and its own credentials, and each is gone with its data when stopped."""
    first, second = ThrowawayS3().start(), ThrowawayS3().start()
    try:
        assert first.service.endpoint != second.service.endpoint
        assert first.secret_access_key != second.secret_access_key
        for server in (first, second):
            assert SEAWEEDFS_BUCKET in _bucket_listing(server)
            env = server.service.env("session-1")
            assert env["AUDIO_STORE_URL"] == f"s3://{SEAWEEDFS_BUCKET}/session-1"
            assert env["AUDIO_S3_ENDPOINT"] == server.service.endpoint
    finally:
        first.stop()
        second.stop()
    for server in (first, second):
        assert server.proc is not None and server.proc.poll() is not None
        assert not server.workdir.exists()
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.service.endpoint, timeout=2)


def test_a_configured_s3_server_is_reused_not_started(monkeypatch):
    """Where the environment names an S3 server that answers, the suite uses it (and its
    bucket) instead of starting SeaweedFS; where it does not answer, a throwaway one starts."""
    server = ThrowawayS3().start()
    try:
        for name, value in server.service.env("x").items():
            monkeypatch.setenv(name, value)
        with s3_server() as reused:
            assert reused == server.service
        monkeypatch.setenv("AUDIO_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        with s3_server() as started:
            assert started.endpoint != server.service.endpoint
            assert started.bucket == SEAWEEDFS_BUCKET
    finally:
        server.stop()
