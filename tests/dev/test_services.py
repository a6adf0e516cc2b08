"""Where no Redis or PostgreSQL answers, the suite and `bcfy run` start throwaway ones."""

from __future__ import annotations

import os
import subprocess

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
