"""Geo refresh: countries, states and counties from the service (the daily job's body).

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
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tasks.geo.tables import COUNTIES, COUNTRIES, STATES, GeoTable, id_of, upsert
from workers.core.jobs import JobContext
from workers.core.records import as_text

log = logging.getLogger(__name__)


class GeoRefreshIncomplete(Exception):
    """Some states or counties could not be fetched; what was fetched is kept."""


async def refresh(ctx: JobContext) -> None:
    """One run: countries, then the states and counties in scope (see the module's docstring)."""
    s = ctx.settings
    api = ctx.runtime.bcfy_api
    countries = await api.countries()
    await upsert(ctx, COUNTRIES, countries)
    wanted_countries = _codes(s.geo.countries)
    in_scope = [
        c
        for c in countries
        if _matches(c, wanted_countries, ("iso_alpha2", "country_code", "coid"))
    ]
    _warn_unmatched(
        "GEO_COUNTRIES", wanted_countries, in_scope, ("iso_alpha2", "country_code", "coid")
    )

    bound = asyncio.Semaphore(s.geo.concurrency)
    failures: list[str] = []
    states = await _fetch_each(
        ctx, bound, failures, "states of country", in_scope, api.states, STATES
    )
    wanted_states = _codes(s.geo.states)
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
        parent_id = id_of(parent.get(parent_key))
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

    results = await asyncio.gather(
        *(one(p) for p in parents if id_of(p.get(parent_key)) is not None)
    )
    return [child for children in results for child in children]


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
