"""Geo refresh: countries, states and counties from the service (daily, singleton).

One run:
  1. fetches the countries and upserts them all;
  2. for each country in scope (GEO_COUNTRIES: ISO alpha-2, country code or coid) fetches its
     states and upserts them, at most GEO_CONCURRENCY requests at a time;
  3. for each state in scope (GEO_STATES, or every state of the countries in scope) fetches its
     counties and upserts them, with the same bound.
Each list is upserted in one statement (its own transaction) with `fetched_at` and the raw
JSON; a country's or state's failure is logged and the rest is kept. The run ends in error,
naming what failed, when anything did, so job_runs shows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from workers.core.jobs import JobContext, periodic_job
from workers.core.records import BadValue, as_text, show, storable, whole_number

log = logging.getLogger(__name__)


class GeoRefreshIncomplete(Exception):
    """Some states or counties could not be fetched; what was fetched is kept."""


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


@periodic_job("tasks.geo.refresh_geo_data")
async def refresh_geo_data(ctx: JobContext) -> None:
    """Refresh the geographic reference tables for the configured scope."""
    s = ctx.settings
    api = ctx.runtime.bcfy_api
    countries = await api.countries()
    await upsert(ctx, COUNTRIES, countries)
    wanted_countries = _codes(s.geo_countries)
    in_scope = [
        c
        for c in countries
        if _matches(c, wanted_countries, ("iso_alpha2", "country_code", "coid"))
    ]
    _warn_unmatched(
        "GEO_COUNTRIES", wanted_countries, in_scope, ("iso_alpha2", "country_code", "coid")
    )

    bound = asyncio.Semaphore(s.geo_concurrency)
    failures: list[str] = []
    states = await _fetch_each(
        ctx, bound, failures, "states of country", in_scope, api.states, STATES
    )
    wanted_states = _codes(s.geo_states)
    states_in_scope = [
        st
        for st in states
        if not wanted_states or _matches(st, wanted_states, ("state_code", "stid"))
    ]
    if wanted_states:
        _warn_unmatched("GEO_STATES", wanted_states, states_in_scope, ("state_code", "stid"))
    counties = await _fetch_each(
        ctx, bound, failures, "counties of state", states_in_scope, api.counties, COUNTIES
    )
    log.info(
        "geo refresh: %d countries, %d states of %d countries, %d counties of %d states",
        len(countries),
        len(states),
        len(in_scope),
        len(counties),
        len(states_in_scope),
    )
    if failures:
        raise GeoRefreshIncomplete(
            f"{len(failures)} lists could not be refreshed (the rest was): "
            + "; ".join(failures[:10])
        )


async def _fetch_each(
    ctx: JobContext,
    bound: asyncio.Semaphore,
    failures: list[str],
    what: str,
    parents: Sequence[dict[str, Any]],
    fetch: Callable[[int], Awaitable[list[dict[str, Any]]]],
    table: GeoTable,
) -> list[dict[str, Any]]:
    """Fetch and upsert the children of each parent (their table's parent_key names its id),
    concurrently within the bound. A failed parent is logged and noted in `failures`; the
    others go on."""
    parent_key = table.parent_key
    assert parent_key is not None, f"{table.name} is not a child table"

    async def one(parent: dict[str, Any]) -> list[dict[str, Any]]:
        parent_id = _id(parent.get(parent_key))
        assert parent_id is not None  # parents without a usable id are left out below
        try:
            async with bound:
                children = await fetch(parent_id)
            # A record that leaves out its parent's id belongs to the parent asked for.
            for child in children:
                child.setdefault(parent_key, parent_id)
            await upsert(ctx, table, children)
            return children
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("geo refresh: %s %s failed: %s", what, parent_id, exc)
            failures.append(f"{what} {parent_id}: {exc}")
            return []

    results = await asyncio.gather(*(one(p) for p in parents if _id(p.get(parent_key)) is not None))
    return [child for children in results for child in children]


async def upsert(ctx: JobContext, table: GeoTable, records: Sequence[dict[str, Any]]) -> int:
    """Insert or update one list in one statement. Records without a usable id are skipped."""
    name, id_col, id_key = table.name, table.id_column, table.id_key
    parent_col, parent_key, columns = table.parent_column, table.parent_key, table.columns
    rows = []
    for record in records:
        record_id = _id(record.get(id_key))
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
        if parent_col:
            row["parent"] = _id(record.get(parent_key))
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


def _codes(setting: str) -> set[str]:
    return {item for item in setting.split(",") if item}


def _matches(record: dict[str, Any], wanted: set[str], keys: Sequence[str]) -> bool:
    return any((as_text(record.get(k)) or "").upper() in wanted for k in keys)


def _warn_unmatched(
    setting: str, wanted: set[str], found: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    seen = {(as_text(r.get(k)) or "").upper() for r in found for k in keys}
    missing = sorted(wanted - seen)
    if missing:
        log.warning(
            "geo refresh: %s names %s, which the service does not list", setting, ", ".join(missing)
        )


def _id(value: Any) -> int | None:
    """A record's id (a whole number for an integer column), or None when it has none."""
    try:
        return whole_number(value, "id", 0, 2**31 - 1)
    except BadValue:
        return None
