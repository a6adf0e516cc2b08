"""Real Redis and PostgreSQL for every test.

Use DATABASE_URL / REDIS_URL when they are set and reachable, else the standard local ports,
else throwaway servers started from the installed binaries. Each test session gets its own
database (dropped at the end) and its own empty Redis database index (flushed at the end).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql

from workers.devservices import (
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_reachable,
    redis_reachable,
)
from workers.migrate import migrate
from workers.settings import reset_settings_cache

ROOT = Path(__file__).resolve().parent.parent

# Fixtures of the ingestion tests (ingest, ingest_manual).
pytest_plugins = ("tests.ingest_fixtures",)


@dataclass
class Services:
    database_url: str
    redis_url: str
    admin_dsn: str

    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


# BCFY_TEST_SERVERS=throwaway skips reachable servers: how the suite runs where there are none.
REUSE = os.environ.get("BCFY_TEST_SERVERS", "reuse") != "throwaway"


def _redis_base() -> Iterator[str]:
    for url in (os.environ.get("REDIS_URL"), "redis://127.0.0.1:6379/0"):
        if REUSE and url and redis_reachable(url):
            yield url
            return
    server = ThrowawayRedis().start()
    try:
        yield server.url
    finally:
        server.stop()


def _postgres_base() -> Iterator[str]:
    for dsn in (os.environ.get("DATABASE_URL"), "postgresql://postgres@127.0.0.1:5432/postgres"):
        if REUSE and dsn and postgres_reachable(dsn):
            yield dsn
            return
    server = ThrowawayPostgres().start()
    try:
        yield server.dsn
    finally:
        server.stop()


def _claim_redis_db(base_url: str) -> tuple[str, redis.Redis]:
    """An empty database index that no one else uses, marked as ours."""
    claim_key = "bcfy:test-session"
    for index in range(15, 0, -1):
        # The index goes in the URL: a URL's own /N would override a db= argument.
        url = urlunsplit(urlsplit(base_url)._replace(path=f"/{index}"))
        client = redis.Redis.from_url(url)
        if client.set(claim_key, str(os.getpid()), nx=True):
            if client.dbsize() == 1:
                return url, client
            client.delete(claim_key)  # someone's data lives here: not ours to use
        client.close()
    raise RuntimeError(f"no empty Redis database index free on {base_url}")


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    redis_gen, pg_gen = _redis_base(), _postgres_base()
    redis_base, pg_base = next(redis_gen), next(pg_gen)
    redis_url, claim = _claim_redis_db(redis_base)
    dbname = f"bcfy_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    database_url = urlunsplit(urlsplit(pg_base)._replace(path=f"/{dbname}"))
    migrate(database_url, say=lambda _: None)
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "REDIS_URL")}
    os.environ["DATABASE_URL"], os.environ["REDIS_URL"] = database_url, redis_url
    reset_settings_cache()
    try:
        yield Services(database_url, redis_url, pg_base)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        claim.flushdb()
        claim.close()
        with psycopg.connect(pg_base, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
        for gen in (redis_gen, pg_gen):
            next(gen, None)


@pytest.fixture
def clean(services: Services) -> Iterator[Services]:
    """Empty queues, locks and run log before a test."""
    client = services.redis()
    for key in client.scan_iter("*"):
        if key != b"bcfy:test-session":
            client.delete(key)
    client.close()
    with services.db() as conn:
        conn.execute("TRUNCATE job_runs")
    reset_settings_cache()
    yield services
    reset_settings_cache()


@pytest.fixture
def sim():
    """A Broadcastify feed simulator on a free port: real clock, demo credentials (DEMO_API_KEYS,
    DEMO_USERS), no playlists yet. Tests wanting a ManualClock make their own FeedSimulator."""
    from workers.simulator import FeedSimulator

    with FeedSimulator(seed=1) as simulator:
        yield simulator
