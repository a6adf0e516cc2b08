"""`bcfy schema`: sql/schema.sql, the whole schema as the migrations leave it, table by table.

bcfy schema            migrate a scratch database and write its schema to sql/schema.sql
bcfy schema --check    exit 1, with a diff, when sql/schema.sql is not what the migrations make

The scratch database lives on DATABASE_URL's server (a throwaway server when none answers) and
is dropped afterwards. Its schema comes from `pg_dump --schema-only --no-owner --no-privileges`,
with what differs between runs and minor versions taken out (the header and its version lines,
SET lines, the `\\restrict` key), and regrouped: each table followed by everything that belongs
to it (sequences, defaults, keys, indexes, foreign keys, triggers), tables in an order that
loads (a referenced table before the tables that refer to it), the trigger functions first.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from workers.cli import Subparsers
from workers.core.migrate import SCHEMA_FILE_NAME, SQL_DIR, discover
from workers.core.settings import Settings

SCHEMA_FILE = SQL_DIR / SCHEMA_FILE_NAME
REGENERATE = "make schema"  # which runs `bcfy schema`


class SchemaError(RuntimeError):
    pass


class NoPgDump(SchemaError):
    """No pg_dump that can read the server is installed."""


# --- pg_dump ---------------------------------------------------------------------------------


def server_major(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.info.server_version // 10000


def _pg_dump_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"(\d+)(?:\.\d+)*", out.stdout)
    return int(found.group(1)) if found else None


def pg_dump_binary(major: int) -> str:
    """A pg_dump of the server's major version (Debian's versioned directory, then PATH); a newer
    one if that is all there is (pg_dump refuses servers newer than itself)."""
    candidates = [f"/usr/lib/postgresql/{major}/bin/pg_dump"]
    candidates += [p for p in [shutil.which("pg_dump")] if p]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))
    newer: list[str] = []
    for path in candidates:
        found = _pg_dump_major(path)
        if found == major:
            return path
        if found is not None and found > major:
            newer.append(path)
    if newer:
        return newer[0]
    raise NoPgDump(
        f"no pg_dump for PostgreSQL {major} found"
        f" (Debian: apt-get install postgresql-client-{major})"
    )


def pg_dump_schema(url: str, major: int) -> str:
    """The database's schema as pg_dump prints it. The password goes in the environment, not on
    the command line (where `ps` would show it)."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    argv = [pg_dump_binary(major), "--schema-only", "--no-owner", "--no-privileges"]
    argv.append("--dbname=" + psycopg.conninfo.make_conninfo("", **params))
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SchemaError(f"pg_dump failed: {done.stderr.strip()}")
    return done.stdout


# --- normalising and regrouping --------------------------------------------------------------

# Each object pg_dump prints comes after a header of this shape.
_HEADER = re.compile(
    r"^--\n-- Name: (?P<name>[^;\n]+); Type: (?P<type>[^;\n]+); Schema: [^;\n]*;"
    r" Owner: [^\n]*\n--\n",
    re.MULTILINE,
)
# Lines that differ between runs or versions, or only set up pg_dump's own session: before the
# first object, after the last, and between objects (never inside one).
_NOISE = re.compile(
    r"^(--.*|SET \w+ = .*;|SELECT pg_catalog\.set_config\('search_path', '', false\);"
    r"|\\(un)?restrict \S+|)$"
)
# Where each kind of object goes: with its table (found in its name or its statement), or in
# the functions section. A kind not listed stops the command, so nothing is silently misplaced.
_TABLE_PARTS = [
    "TABLE",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "DEFAULT",
    "CONSTRAINT",
    "INDEX",
    "FK CONSTRAINT",
    "TRIGGER",
]
_REFERENCES = re.compile(r"REFERENCES public\.(\"?[\w]+\"?)\(")
_INDEX_ON = re.compile(r" ON (?:ONLY )?public\.(\"?[\w]+\"?) USING ")
_OWNED_BY = re.compile(r"OWNED BY public\.(\"?[\w]+\"?)\.")


@dataclass
class Block:
    kind: str
    name: str
    sql: str


def _strip_noise(lines: list[str]) -> list[str]:
    while lines and _NOISE.match(lines[0]):
        lines = lines[1:]
    while lines and _NOISE.match(lines[-1]):
        lines = lines[:-1]
    return lines


def parse_dump(dump: str) -> list[Block]:
    """pg_dump's objects in its order, each statement without the noise around it."""
    heads = list(_HEADER.finditer(dump))
    prelude = _strip_noise(dump[: heads[0].start() if heads else len(dump)].splitlines())
    if prelude:
        raise SchemaError(f"pg_dump printed something unexpected before its objects: {prelude}")
    blocks = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(dump)
        body = _strip_noise(dump[head.end() : end].splitlines())
        blocks.append(Block(head["type"], head["name"], "\n".join(body)))
    return blocks


def _table_of(block: Block, sequence_owner: dict[str, str]) -> str:
    if block.kind == "TABLE":
        return block.name
    if block.kind == "SEQUENCE":
        if block.name not in sequence_owner:
            raise SchemaError(f"sequence {block.name} belongs to no table; place it by hand")
        return sequence_owner[block.name]
    if block.kind == "INDEX":
        found = _INDEX_ON.search(block.sql)
        if not found:
            raise SchemaError(f"cannot tell the table of index {block.name}: {block.sql}")
        return found.group(1)
    if block.kind == "SEQUENCE OWNED BY":
        return sequence_owner[block.name]
    return block.name.split(" ", 1)[0]  # "table constraint", "table column", "table trigger"


def _load_order(tables: dict[str, list[Block]]) -> list[str]:
    """Tables by name, except that a table comes after the tables its foreign keys refer to."""
    needs = {
        table: {
            target
            for b in blocks
            if b.kind == "FK CONSTRAINT"
            for target in _REFERENCES.findall(b.sql)
            if target != table
        }
        for table, blocks in tables.items()
    }
    order: list[str] = []
    while needs:
        ready = sorted(t for t, deps in needs.items() if not deps - set(order))
        if not ready:
            raise SchemaError(f"foreign keys refer to each other in a circle: {sorted(needs)}")
        order.append(ready[0])
        del needs[ready[0]]
    return order


def render(dump: str, migrations: list[str], major: int) -> str:
    """sql/schema.sql's text from pg_dump's output."""
    blocks = parse_dump(dump)
    sequence_owner = {}
    for b in blocks:
        if b.kind == "SEQUENCE OWNED BY":
            found = _OWNED_BY.search(b.sql)
            if not found:
                raise SchemaError(f"cannot tell the table of sequence {b.name}: {b.sql}")
            sequence_owner[b.name] = found.group(1)
    functions: list[Block] = []
    tables: dict[str, list[Block]] = {}
    for b in blocks:
        if b.kind == "FUNCTION":
            functions.append(b)
        elif b.kind in _TABLE_PARTS:
            tables.setdefault(_table_of(b, sequence_owner), []).append(b)
        else:
            raise SchemaError(
                f"pg_dump printed a {b.kind} ({b.name}), which workers/cli/schema.py does not "
                "place yet: teach render() where it belongs"
            )
    span = f"sql/{migrations[0]} .. sql/{migrations[-1]}" if migrations else "(none)"
    out = [
        f"-- The whole schema after the migrations {span},",
        "-- table by table: each with its sequences, defaults, keys, indexes, foreign keys and",
        "-- triggers.",
        f"-- Written by `bcfy schema` (`make schema`) from PostgreSQL {major}'s pg_dump. Do not",
        "-- edit: change the schema with a new migration, then regenerate",
        "-- (tests/core/test_schema.py checks that this file is current). Databases are made by",
        "-- `bcfy migrate`, not from this file.",
        "",
    ]
    if functions:
        out += ["-- Functions (the triggers below call them)", ""]
        out += [f"{b.sql}\n" for b in functions]
    for table in _load_order(tables):
        out += [f"-- {table} " + "-" * max(3, 94 - len(table)), ""]
        parts = sorted(tables[table], key=lambda b: _TABLE_PARTS.index(b.kind))  # stable
        out += [f"{b.sql}\n" for b in parts]
    return "\n".join(out).rstrip("\n") + "\n"


# --- the scratch database ----------------------------------------------------------------------


def _server_url(database_url: str) -> str:
    """The URL of the server's `postgres` database, where scratch databases are made."""
    return urlunsplit(urlsplit(database_url)._replace(path="/postgres"))


def generate(admin_url: str) -> str:
    """Migrate a scratch database on admin_url's server and return sql/schema.sql's text."""
    from workers.dev.services import scratch_database

    with scratch_database(admin_url, "bcfy_schema") as url:
        major = server_major(url)
        dump = pg_dump_schema(url, major)
    return render(dump, [m.path.name for m in discover()], major)


def difference(expected: str, path: Path) -> str:
    """A unified diff from the file as it is to what it should be; empty when they agree."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{path} (committed)",
            f"{path} (from the migrations)",
        )
    )


def stale_message(path: Path) -> str:
    return f"{path} is not the schema the migrations make: run `{REGENERATE}` and commit it"


# --- the command -------------------------------------------------------------------------------


def add_commands(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "schema", help="write sql/schema.sql: the whole schema after all migrations"
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare: exit 1 with a diff when it is stale"
    )
    parser.add_argument("--file", type=Path, default=SCHEMA_FILE, help=argparse.SUPPRESS)
    parser.set_defaults(handler=schema)


def schema(args: argparse.Namespace, settings: Settings) -> int:
    from workers.dev.services import ServiceError, postgres_server

    try:
        with postgres_server(_server_url(settings.services.database_url.reveal())) as admin_url:
            text = generate(admin_url)
    except (SchemaError, ServiceError, psycopg.Error) as exc:
        print(f"bcfy schema: {exc}", file=sys.stderr)
        return 1
    path: Path = args.file
    diff = difference(text, path)
    if args.check:
        if diff:
            sys.stdout.write(diff)
            print(f"bcfy schema: {stale_message(path)}", file=sys.stderr)
            return 1
        print(f"{path} is current")
        return 0
    if diff:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    else:
        print(f"{path} is current")
    return 0
