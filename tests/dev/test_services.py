"""Where no Redis or PostgreSQL answers, the suite and `bcfy run` start throwaway ones."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.procs import pytest_argv
from workers.dev.procs import ROOT
from workers.dev.services import (
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_reachable,
    redis_reachable,
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
