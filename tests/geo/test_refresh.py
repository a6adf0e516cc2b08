"""Geo refresh against the simulator: countries, the states of the countries in scope and the
counties of the states in scope, upserted with fetched_at and the raw JSON; a failed list keeps
the rest."""

from __future__ import annotations

import logging

import pytest

from workers.clients.broadcastify import TransientError
from workers.dev.simulator.geo import COUNTIES, COUNTRIES, STATES

GEO = "tasks.geo.refresh_geo_data"
US_STATES = {s["stid"] for s in STATES if s["coid"] == 1}


@pytest.mark.parametrize("wrapper", ["named", "data"])
def test_the_default_scope_fills_the_three_tables(ingest, wrapper):
    ing = ingest
    ing.sim.faults.geo_wrapper = wrapper
    assert ing.refresh_geo() == "ok"

    countries = ing.sql(
        "SELECT country_id, name, code, iso_alpha2, raw, fetched_at FROM bcfy_countries"
    )
    assert {c[0] for c in countries} == {c["coid"] for c in COUNTRIES}
    us = next(c for c in countries if c[0] == 1)
    assert us[1:4] == ("United States", "USA", "US")
    assert us[4] == next(c for c in COUNTRIES if c["coid"] == 1) and us[5] is not None

    states = ing.sql("SELECT state_id, country_id, name, code, raw FROM bcfy_states")
    assert {s[0] for s in states} == US_STATES  # the US only, by default
    ca = next(s for s in states if s[0] == 6)
    assert ca[1:4] == (1, "California", "CA") and ca[4]["state_name"] == "California"

    counties = ing.sql("SELECT county_id, state_id, name, raw, fetched_at FROM bcfy_counties")
    expected = {c["ctid"] for c in COUNTIES if c["stid"] in US_STATES}
    assert {c[0] for c in counties} == expected
    cook = next(c for c in counties if c[0] == 578)
    assert cook[1:3] == (17, "Cook") and cook[3]["county_name"] == "Cook"
    assert ing.sim.requests["states"] == 1 and ing.sim.requests["counties"] == len(US_STATES)


def test_a_second_refresh_updates_in_place(ingest):
    ing = ingest
    assert ing.refresh_geo() == "ok"
    (first,) = ing.sql("SELECT fetched_at FROM bcfy_counties WHERE county_id = 578")[0]
    ing.sql("UPDATE bcfy_counties SET name = 'stale' WHERE county_id = 578")
    assert ing.refresh_geo() == "ok"
    (name, again) = ing.sql("SELECT name, fetched_at FROM bcfy_counties WHERE county_id = 578")[0]
    assert name == "Cook" and again > first
    assert ing.sql("SELECT count(*) FROM bcfy_counties")[0][0] == len(
        [c for c in COUNTIES if c["stid"] in US_STATES]
    )


def test_the_scope_is_configurable(ingest):
    ing = ingest
    ing.configure(GEO_COUNTRIES="us,CAN", GEO_STATES="IL,on,36")
    assert ing.refresh_geo() == "ok"
    assert {s for (s,) in ing.sql("SELECT state_id FROM bcfy_states")} == {
        s["stid"] for s in STATES
    }
    assert {s for (s,) in ing.sql("SELECT DISTINCT state_id FROM bcfy_counties")} == {17, 60, 36}


def test_a_failed_state_is_logged_and_the_rest_kept(ingest, caplog):
    ing = ingest
    ing.configure(GEO_CONCURRENCY=2)
    real = ing.api.counties

    async def counties(stid: int):
        if stid == 17:
            raise TransientError("/common/v1/counties/17: HTTP 503", status=503)
        return await real(stid)

    ing.api.counties = counties
    with caplog.at_level(logging.WARNING):
        assert ing.refresh_geo() == "error"
    assert "counties of state 17 failed" in caplog.text
    stored = {s for (s,) in ing.sql("SELECT DISTINCT state_id FROM bcfy_counties")}
    assert stored == US_STATES - {17}
    (_, error) = ing.runs(GEO)[-1]
    assert "GeoRefreshIncomplete" in error and "counties of state 17" in error


def test_a_refresh_through_real_failures_retries_and_completes(ingest):
    ing = ingest
    ing.sim.faults.fail_next_500 = 2
    ing.sim.faults.fail_next_429, ing.sim.faults.retry_after = 1, 0
    assert ing.refresh_geo() == "ok"
    assert ing.sql("SELECT count(*) FROM bcfy_counties")[0][0] == len(
        [c for c in COUNTIES if c["stid"] in US_STATES]
    )
