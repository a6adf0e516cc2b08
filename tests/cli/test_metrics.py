"""`bcfy metrics` over real HTTP: loopback by default, and a crowd of scrapers costs one small
pool of database connections, each of them still getting a complete page."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import Services
from tests.support.procs import listening_addresses, start_metrics
from workers.core.rows import one_row
from workers.dev.procs import wait_until
from workers.dev.services import free_port

SCRAPERS = 40
POOL_CONNECTIONS = 2  # the most `bcfy metrics` may hold (its pool has one)


@pytest.fixture
def limited_role(clean: Services) -> Iterator[str]:
    """DATABASE_URL for a role that may hold at most POOL_CONNECTIONS connections: one more
    is refused by PostgreSQL itself, so exceeding the pool shows on the scraped page."""
    role = f"bcfy_metrics_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(clean.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {}").format(
                sql.Identifier(role), sql.Literal(POOL_CONNECTIONS)
            )
        )
        conn.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(role)))
    parts = urlsplit(clean.database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    yield urlunsplit(parts._replace(netloc=f"{role}@{host}"))
    with psycopg.connect(clean.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_metrics_listen_on_loopback_by_default(clean: Services, tmp_path: Path, procs):
    port = free_port()
    start_metrics(clean.worker_env(tmp_path), tmp_path, procs, port)
    assert listening_addresses(port) == {"127.0.0.1"}


def test_forty_concurrent_scrapes_share_one_small_pool(
    clean: Services, limited_role: str, tmp_path: Path, procs
):
    env = clean.worker_env(tmp_path, DATABASE_URL=limited_role)
    url = start_metrics(env, tmp_path, procs, free_port())
    peak = [0]
    done = threading.Event()

    def watch_connections() -> None:
        with psycopg.connect(clean.admin_dsn, autocommit=True) as conn:
            while not done.is_set():
                (n,) = one_row(
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                        (urlsplit(limited_role).username,),
                    ).fetchone()
                )
                peak[0] = max(peak[0], n)

    pages: list[str] = [""] * SCRAPERS
    go = threading.Barrier(SCRAPERS)

    def scrape(i: int) -> None:
        go.wait()
        pages[i] = httpx.get(url, timeout=120).text

    watcher = threading.Thread(target=watch_connections)
    watcher.start()
    scrapers = [threading.Thread(target=scrape, args=(i,)) for i in range(SCRAPERS)]
    try:
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join()
    finally:
        done.set()
        watcher.join()
    print(f"\n{SCRAPERS} concurrent scrapes: at most {peak[0]} database connections seen")
    for page in pages:
        assert "bcfy_scrape_ok 1.0" in page, page[-2000:]
        assert 'bcfy_stage_backlog{stage="audio"}' in page
    assert peak[0] <= POOL_CONNECTIONS

    # A later scrape, past the cache's age, reads afresh and still gets its page.
    with psycopg.connect(clean.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE job_runs")

    def fresh() -> str | None:
        page = httpx.get(url, timeout=30).text
        return page if "bcfy_scrape_ok 1.0" in page else None

    wait_until(fresh, 60, "a fresh scrape")
