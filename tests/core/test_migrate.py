"""Migrations: apply on an empty database, re-apply as a no-op, two at once do not conflict."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Services
from workers.core.migrate import SQL_DIR, MigrationError, discover, migrate
from workers.dev.procs import ROOT

SEED_TABLES = {
    "bcfy_calls_raw",
    "bcfy_playlists",
    "bcfy_playlist_poll_log",
    "bcfy_countries",
    "bcfy_states",
    "bcfy_counties",
    "transcripts",
    "job_runs",
}


@pytest.fixture
def empty_db(services: Services):
    name = f"bcfy_mig_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(services.admin_dsn)._replace(path=f"/{name}"))
    yield url
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def bcfy_migrate(url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "migrate"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_creates_the_database_and_applies_everything_then_is_a_noop(empty_db):
    first = bcfy_migrate(empty_db)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "created the database" in out and "applied 001_foundation.sql" in out
    assert SEED_TABLES <= tables(empty_db)
    second = bcfy_migrate(empty_db)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "up to date" in out and "applied" not in out


def test_two_concurrent_migrations_do_not_conflict(empty_db):
    runs = [bcfy_migrate(empty_db) for _ in range(3)]
    results = [(p.wait(60), *p.communicate()) for p in runs]
    assert all(code == 0 for code, _, _ in results), results
    applied = [
        line for _, out, _ in results for line in out.splitlines() if line.startswith("applied")
    ]
    assert sorted(applied) == sorted(f"applied {m.path.name}" for m in discover())
    with psycopg.connect(empty_db) as conn:
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [v for (v,) in versions] == [m.version for m in discover()]


def test_an_edited_applied_migration_is_refused(empty_db, tmp_path, services):
    psycopg.connect(services.admin_dsn, autocommit=True).execute(
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(urlsplit(empty_db).path[1:]))
    )
    shutil.copytree(SQL_DIR, tmp_path / "sql")
    migrate(empty_db, tmp_path / "sql", say=lambda _: None)
    first = sorted((tmp_path / "sql").glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        migrate(empty_db, tmp_path / "sql", say=lambda _: None)


def test_a_failing_migration_leaves_nothing_half_applied(empty_db, tmp_path, services):
    psycopg.connect(services.admin_dsn, autocommit=True).execute(
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(urlsplit(empty_db).path[1:]))
    )
    shutil.copytree(SQL_DIR, tmp_path / "sql")
    (tmp_path / "sql" / "900_broken.sql").write_text(
        "CREATE TABLE half_done (x int);\nSELECT no_such_function();\n"
    )
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(empty_db, tmp_path / "sql", say=lambda _: None)
    assert "half_done" not in tables(empty_db)
    assert SEED_TABLES <= tables(empty_db)  # the good ones before it stay applied
