"""Schema migrations: `sql/NNN_name.sql`, applied in order by `bcfy migrate`.

Each file runs in its own transaction and is recorded in `schema_migrations` with a checksum.
A session-level advisory lock serialises concurrent runs (two deploys at once): the second
waits, then finds nothing left to do. Re-running is a no-op; an applied file that was edited
afterwards is an error, never silently re-run.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

# A checkout (editable install) has sql/ beside the packages; an installed package (the container
# image) has the copy that pyproject's data-files put under the environment's prefix.
_CHECKOUT_SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
SQL_DIR = (
    _CHECKOUT_SQL_DIR
    if _CHECKOUT_SQL_DIR.is_dir()
    else Path(sys.prefix) / "share" / "bcfy-pipeline" / "sql"
)
# Arbitrary but fixed: the key of the advisory lock that serialises migrations.
ADVISORY_LOCK_KEY = 0x6263_6679_0001
_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Not a migration: the schema they make, for reading (written by `bcfy schema`).
SCHEMA_FILE_NAME = "schema.sql"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        if path.name == SCHEMA_FILE_NAME:
            continue
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"{path.name}: version {version} also in {found[version].path.name}"
            )
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


def ensure_database(dsn: str) -> bool:
    """Create the database named in `dsn` if it does not exist. True when it was created."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    dbname = str(info["dbname"]) if "dbname" in info else None
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
        return False
    except psycopg.OperationalError as exc:
        if not dbname or f'database "{dbname}" does not exist' not in str(exc):
            raise
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        # Two first deploys at once: the second waits here, then finds the database made.
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return True


def migrate(dsn: str, sql_dir: Path = SQL_DIR, say: Callable[[str], None] = print) -> list[str]:
    """Apply every pending migration; return the names applied (empty when up to date)."""
    migrations = discover(sql_dir)
    applied_now: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
            applied = {version: (name, checksum) for version, name, checksum in rows}
            for m in migrations:
                if m.version in applied:
                    if applied[m.version][1] != m.checksum:
                        raise MigrationError(
                            f"{m.path.name} was changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(m.sql.encode())  # no parameters: several statements allowed
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                applied_now.append(m.path.name)
                say(f"applied {m.path.name}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    if not applied_now:
        say(f"database is up to date ({len(migrations)} migrations)")
    return applied_now
