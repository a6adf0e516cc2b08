"""How the service's geographic lists map onto tables, and their upsert.

Each list is upserted in one statement (its own transaction) with `fetched_at` and the raw JSON
(what jsonb cannot hold replaced); a record without a usable id is logged and skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from workers.core.jobs import JobContext
from workers.core.records import BadValue, as_text, show, storable, whole_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeoTable:
    """How one list of the service maps onto one table."""

    name: str
    id_column: str
    id_key: str  # the id's key in the service's records
    parent_column: str | None
    parent_key: str | None
    columns: tuple[tuple[str, str], ...]  # (column, key) of the typed text columns


COUNTRIES = GeoTable(
    "bcfy_countries", "country_id", "coid", None, None,
    (("name", "country_name"), ("code", "country_code"), ("iso_alpha2", "iso_alpha2")),
)  # fmt: skip
STATES = GeoTable(
    "bcfy_states", "state_id", "stid", "country_id", "coid",
    (("name", "state_name"), ("code", "state_code")),
)  # fmt: skip
COUNTIES = GeoTable(
    "bcfy_counties", "county_id", "ctid", "state_id", "stid", (("name", "county_name"),)
)


async def upsert(ctx: JobContext, table: GeoTable, records: Sequence[dict[str, Any]]) -> int:
    """Insert or update one list in one statement. Records without a usable id are skipped."""
    name, id_col, id_key = table.name, table.id_column, table.id_key
    parent_col, parent_key, columns = table.parent_column, table.parent_key, table.columns
    rows = []
    for record in records:
        record_id = id_of(record.get(id_key))
        if record_id is None:
            log.warning(
                "geo refresh: %s record without a usable %s skipped: %s",
                name,
                id_key,
                show(record),
            )
            continue
        # raw as received, but with what jsonb cannot hold (NUL, NaN) replaced.
        row: dict[str, Any] = {"id": record_id, "raw": storable(record)}
        if parent_col and parent_key:
            row["parent"] = id_of(record.get(parent_key))
        for column, key in columns:
            row[column] = as_text(record.get(key))
        rows.append(row)
    if not rows:
        return 0
    cols = [id_col, *([parent_col] if parent_col else []), *(c for c, _ in columns), "raw"]
    fields = ["id", *(["parent"] if parent_col else []), *(c for c, _ in columns), "raw"]
    types = ["integer"] * (2 if parent_col else 1) + ["text"] * len(columns) + ["jsonb"]
    query = sql.SQL(
        "INSERT INTO {table} ({cols}, fetched_at)"
        " SELECT {fields}, now() FROM jsonb_to_recordset(%s::jsonb) AS r({typed})"
        " ON CONFLICT ({id}) DO UPDATE SET {updates}, fetched_at = EXCLUDED.fetched_at"
    ).format(
        table=sql.Identifier(name),
        cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
        fields=sql.SQL(", ").join(sql.Identifier("r", f) for f in fields),
        typed=sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(f), sql.SQL(t))
            for f, t in zip(fields, types, strict=True)
        ),
        id=sql.Identifier(id_col),
        updates=sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in cols[1:]
        ),
    )
    # One list may name an id twice; ON CONFLICT DO UPDATE cannot touch a row twice.
    unique = list({row["id"]: row for row in rows}.values())
    async with ctx.connection() as conn:
        ctx.ensure_lock()
        await conn.execute(query, (json.dumps(unique),))
    return len(unique)


def id_of(value: object) -> int | None:
    """A record's id (a whole number for an integer column), or None when it has none."""
    try:
        return whole_number(value, "id", 0, 2**31 - 1)
    except BadValue:
        return None
