"""Real Redis and PostgreSQL for every test.

Use DATABASE_URL / REDIS_URL when they are set and reachable, else the standard local ports,
else throwaway servers started from the installed binaries. Each test session gets its own
database (dropped at the end) and its own empty Redis database index (flushed at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from psycopg.rows import namedtuple_row

from workers.core.children import sigterm_unwinds
from workers.core.settings import reset_settings_cache
from workers.dev.procs import Proc
from workers.dev.services import Servers, scratch_servers

ROOT = Path(__file__).resolve().parent.parent

# Fixtures of the ingestion tests (ingest, ingest_manual) and of the S3 server (s3_service, s3_env).
pytest_plugins = ("tests.support.ingest", "tests.support.s3")


@dataclass(frozen=True)
class Services(Servers):
    """The session's servers (Servers: db(), redis(), worker_env()), the PostgreSQL server's
    admin DSN, and what the tests read back from them."""

    def job_runs(self, job: str, outcome: str | None = None) -> list[Any]:
        """The job's runs as job_runs records them (all, or those with `outcome`), in the order
        they started: rows of (outcome, started_at, ended_at, error, worker)."""
        with self.db() as conn:
            cur = conn.cursor(row_factory=namedtuple_row)
            return cur.execute(
                "SELECT outcome, started_at, ended_at, error, worker FROM job_runs"
                " WHERE job = %(job)s AND (%(outcome)s::text IS NULL OR outcome = %(outcome)s)"
                " ORDER BY started_at, id",
                {"job": job, "outcome": outcome},
            ).fetchall()

    def queued_tasks(self, queue: str) -> list[str]:
        """The task names of the messages waiting in a Celery queue."""
        client = self.redis()
        try:
            return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]
        finally:
            client.close()


# BCFY_TEST_SERVERS=throwaway skips reachable servers: how the suite runs where there are none.
REUSE = os.environ.get("BCFY_TEST_SERVERS", "reuse") != "throwaway"
CLAIM_KEY = "bcfy:test-session"

_session = contextlib.ExitStack()
_services: Services | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Find or start the servers, make this session's database, and point the environment at
    them before any test module is imported: modules that read the settings at import (the
    Celery app takes its broker from them) then see this session's servers."""
    global _services
    # SIGTERM (as from `timeout` or CI) unwinds like Ctrl-C: fixtures are torn down, so the
    # workers, servers and scratch database of this session are stopped and removed.
    sigterm_unwinds()
    servers = _session.enter_context(scratch_servers("bcfy_test", CLAIM_KEY, reuse=REUSE))
    for name in ("DATABASE_URL", "REDIS_URL"):
        _session.callback(_restore_env, name, os.environ.get(name))
    os.environ["DATABASE_URL"], os.environ["REDIS_URL"] = servers.database_url, servers.redis_url
    reset_settings_cache()
    _services = Services(servers.database_url, servers.redis_url, servers.admin_dsn)


def pytest_unconfigure(config: pytest.Config) -> None:
    left = Proc.stop_all()  # before the servers and the database go
    if left:
        print(f"\nstopped {len(left)} processes still running at the end: {', '.join(left)}")
    _session.close()


@pytest.fixture(autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After each test, no worker or beat it started is still running: one left behind would
    take messages from the shared queues during later tests."""
    before = set(Proc.running)
    yield
    left = [p for p in Proc.running if p not in before]
    for proc in left:
        proc.stop(timeout=10)
    if left:
        warnings.warn(
            f"the test left {', '.join(p.name for p in left)} running (now stopped)",
            stacklevel=1,
        )


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(scope="session")
def services() -> Services:
    """This session's PostgreSQL database (migrated) and Redis database index."""
    assert _services is not None
    return _services


@pytest.fixture
def clean(services: Services) -> Iterator[Services]:
    """Empty queues, locks and run log before a test."""
    client = services.redis()
    for key in client.scan_iter("*"):
        if key != CLAIM_KEY.encode():
            client.delete(key)
    client.close()
    with services.db() as conn:
        conn.execute("TRUNCATE job_runs")
    reset_settings_cache()
    yield services
    reset_settings_cache()


@pytest.fixture
def db(clean: Services) -> Iterator[psycopg.Connection]:
    """A connection (autocommit) to the database with no calls in it, as the audio tests start;
    the process's runtime is shut down after the test."""
    from tests.support.audio import truncate_calls
    from workers.core.runtime import Runtime

    with clean.db() as conn:
        truncate_calls(conn)
        yield conn
    Runtime.shutdown_current()


@pytest.fixture
def sim():
    """A Broadcastify feed simulator on a free port: real clock, demo credentials (DEMO_API_KEYS,
    DEMO_USERS), no playlists yet. Tests wanting a ManualClock make their own FeedSimulator."""
    from workers.dev.simulator import FeedSimulator

    with FeedSimulator(seed=1) as simulator:
        yield simulator


@pytest.fixture
def client(clean: Services) -> Iterator[Celery]:
    """A bare Celery client on the test broker: sends by task name, like other stages do."""
    app = Celery(broker=clean.redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    yield app
    app.close()


@pytest.fixture
def stop_grace() -> float:
    """Seconds a worker stopped after a test gets to finish its tasks before it is killed."""
    return 5


@pytest.fixture
def procs(stop_grace: float) -> Iterator[list[Proc]]:
    """Worker and beat processes a test starts (append them): stopped after it, with their
    pool children."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(timeout=stop_grace)
