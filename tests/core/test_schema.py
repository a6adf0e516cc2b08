"""sql/schema.sql: the whole schema after all migrations, in one file, kept current by a test.

It is what `bcfy schema` makes from a freshly migrated database; it loads into an empty
database as exactly that schema (so regrouping pg_dump's output lost nothing); its text does not
depend on what differs between pg_dump runs and minor versions; and `bcfy schema --check` fails
on a stale file, naming the command that regenerates it.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tests.conftest import Services
from workers.cli.schema import (
    REGENERATE,
    SCHEMA_FILE,
    NoPgDump,
    SchemaError,
    difference,
    generate,
    pg_dump_schema,
    render,
    server_major,
    stale_message,
)
from workers.core.migrate import discover
from workers.dev.procs import run_cli
from workers.dev.services import scratch_database

MIGRATIONS = [m.path.name for m in discover()]


def _needs_pg_dump(exc: NoPgDump) -> None:
    pytest.skip(f"{exc}: sql/schema.sql cannot be checked here")


@pytest.fixture(scope="module")
def migrated_dump(services: Services) -> tuple[str, int]:
    """pg_dump's output for a freshly migrated database, and the server's major version."""
    with scratch_database(services.admin_dsn, "bcfy_schema_t") as url:
        major = server_major(url)
        try:
            return pg_dump_schema(url, major), major
        except NoPgDump as exc:
            _needs_pg_dump(exc)
            raise


@pytest.fixture
def empty_db(services: Services) -> Iterator[str]:
    name = f"bcfy_schema_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlunsplit(urlsplit(services.admin_dsn)._replace(path=f"/{name}"))
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_schema_sql_is_what_the_migrations_make(services):
    try:
        expected = generate(services.admin_dsn)
    except NoPgDump as exc:
        _needs_pg_dump(exc)
    diff = difference(expected, SCHEMA_FILE)
    assert not diff, f"{stale_message(SCHEMA_FILE)}\n{diff}"


def test_each_table_is_shown_whole_in_one_place():
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    audio = text.split("-- call_audio ---", 1)[1].split("\n-- call_audio_attempts ---", 1)[0]
    # The table, its keys, its indexes and the triggers on it, together.
    assert "CREATE TABLE public.call_audio (" in audio
    assert "original_pruned_at timestamp with time zone" in audio  # added by 006
    assert "call_audio_ready_has_audio" in audio  # the check 006 put in place of 003's
    assert "PRIMARY KEY (call_id)" in audio and "REFERENCES public.bcfy_calls_raw(id)" in audio
    assert "CREATE INDEX call_audio_due ON public.call_audio" in audio
    assert "CREATE TRIGGER call_transcription_on_ready_update" in audio
    assert text.count("CREATE TABLE public.call_audio (") == 1


def test_schema_sql_loads_into_an_empty_database_as_the_same_schema(empty_db):
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(text.encode())  # no parameters: several statements at once
    major = server_major(empty_db)
    try:
        again = render(pg_dump_schema(empty_db, major), MIGRATIONS, major)
    except NoPgDump as exc:
        _needs_pg_dump(exc)
    assert again == text


# What differs between runs and PostgreSQL minor versions: the key of `\restrict` (new in 15.14,
# random on every run), the version lines, and the SET lines a version adds or drops.
_KEY = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=1)
_VERSION = st.from_regex(r"\A1[5-9]\.[0-9]{1,2}( \([A-Za-z0-9 .+~-]{0,40}\))?\Z")
_SET = st.from_regex(r"\ASET [a-z_]{1,30} = [a-z0-9']{1,10};\Z")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_KEY, server=_VERSION, client=_VERSION, sets=st.lists(_SET, max_size=4))
def test_the_text_does_not_depend_on_run_or_minor_version(migrated_dump, key, server, client, sets):
    dump, major = migrated_dump
    baseline = render(dump, MIGRATIONS, major)
    varied = re.sub(r"^(\\(?:un)?restrict) \S+$", rf"\1 {key}", dump, flags=re.M)
    varied = re.sub(r"^(-- Dumped from database version) .*$", rf"\1 {server}", varied, flags=re.M)
    varied = re.sub(r"^(-- Dumped by pg_dump version) .*$", rf"\1 {client}", varied, flags=re.M)
    varied = varied.replace("SET row_security = off;\n", "".join(f"{s}\n" for s in sets), 1)
    assert render(varied, MIGRATIONS, major) == baseline


def test_an_object_it_cannot_place_stops_it_with_its_name(migrated_dump):
    dump, major = migrated_dump
    view = "--\n-- Name: recent; Type: VIEW; Schema: public; Owner: -\n--\n\nCREATE VIEW ...;\n"
    with pytest.raises(SchemaError, match=r"a VIEW \(recent\)"):
        render(dump + view, MIGRATIONS, major)


def test_bcfy_schema_check_fails_on_a_stale_file_and_names_the_command(services, tmp_path: Path):
    if shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not installed")
    copy = tmp_path / "schema.sql"
    copy.write_text(
        SCHEMA_FILE.read_text(encoding="utf-8").replace("    attempts integer DEFAULT 0", "", 1)
    )
    env = {"DATABASE_URL": services.database_url}

    stale = run_cli("schema", "--check", "--file", str(copy), env=env, timeout=120)
    assert stale.returncode == 1, stale.stderr
    assert REGENERATE in stale.stderr and "commit it" in stale.stderr
    assert "+    attempts integer DEFAULT 0" in stale.stdout, "the diff shows what is missing"

    wrote = run_cli("schema", "--file", str(copy), env=env, timeout=120)
    assert wrote.returncode == 0, wrote.stderr
    assert copy.read_text() == SCHEMA_FILE.read_text()
    current = run_cli("schema", "--check", "--file", str(copy), env=env, timeout=120)
    assert current.returncode == 0 and "is current" in current.stdout
