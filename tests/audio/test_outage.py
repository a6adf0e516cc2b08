"""The audio stage when PostgreSQL goes away in the middle of a batch: downloads finish while
their outcomes cannot be recorded, the worker lives on, and once the database is back every call
ends ready exactly once, its files matching their checksums. The test runs its own PostgreSQL
server, since it stops it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Services
from tests.support.audio import (
    add_calls,
    assert_stored_files_match,
    attempts,
    lease_env,
    start_audio,
    states,
)
from workers.dev.calls import slow_audio
from workers.dev.procs import wait_until
from workers.dev.services import ServiceError, ThrowawayPostgres, scratch_database

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres(clean: Services) -> Iterator[tuple[ThrowawayPostgres, Services]]:
    try:
        pg = ThrowawayPostgres().start()
    except (ServiceError, FileNotFoundError) as exc:
        pytest.skip(
            "SKIPPED: no PostgreSQL binaries (initdb, pg_ctl) to start a server of its own, which"
            f" this test stops (.ci/run installs Debian's postgresql): {exc}"
        )
    try:
        with scratch_database(pg.dsn, "bcfy_outage") as url:
            yield pg, Services(url, clean.redis_url, pg.dsn)
            if not pg.started:
                pg.start_server()  # the database is dropped on the way out
    finally:
        pg.stop()


def connect(services: Services) -> psycopg.Connection:
    return wait_until(lambda: _try_connect(services), 30, "PostgreSQL to answer")


def _try_connect(services: Services) -> psycopg.Connection | None:
    try:
        return services.db()
    except psycopg.OperationalError:
        return None


def test_postgres_down_mid_batch_loses_nothing_and_prepares_each_call_once(
    own_postgres, procs, sim, tmp_path: Path
):
    pg, services = own_postgres
    slow_audio(sim, 1.5)
    with services.db() as db:
        calls = add_calls(db, sim, 12)
    env = lease_env(services, tmp_path, sim, batch=12, downloads=3, lease=4)
    env["DB_CONNECT_TIMEOUT_SEC"] = "2"
    worker = start_audio(procs, env, tmp_path, beat=True)
    with services.db() as db:
        wait_until(lambda: len(attempts(db)) >= 3, 30, "downloads under way")
        assert states(db).get("ready", 0) < len(calls)

    pg.stop_server()  # as a crash would: every connection is cut
    down_since = time.monotonic()
    # The downloads under way finish while their outcomes cannot be written.
    worker.wait_for_log("its outcome could not be recorded", timeout=90)
    time.sleep(max(0.0, down_since + 5 - time.monotonic()))  # down longer than a 4 s lease
    assert worker.alive()
    pg.start_server()

    with connect(services) as db:
        wait_until(lambda: states(db).get("ready") == len(calls), 90, "every call ready")
        ready = Counter(a[0] for a in attempts(db) if a[3] == "ready")
        assert ready == Counter(dict.fromkeys(calls, 1)), "each call prepared once"
        assert assert_stored_files_match(db, tmp_path / "store") == len(calls)
    assert worker.alive()
    log = worker.log()
    assert "its outcome could not be recorded" in log, log[-3000:]
    assert sim.requests["audio"] > len(calls), "some calls were downloaded again"
