"""The geo job over real HTTP: at most GEO_CONCURRENCY list requests in flight at once, as the
simulator sees them; a county list that fails with HTTP 500 is retried and stored, and one that
keeps failing is recorded as the run's error while every other state's counties are stored."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from workers.dev.simulator import FeedSimulator
from workers.dev.simulator.geo import COUNTIES, STATES
from workers.dev.simulator.server import _Answer

GEO = "tasks.geo.refresh_geo_data"
US_STATES = {s["stid"] for s in STATES if s["coid"] == 1}
COUNTRY_IDS = sorted({s["coid"] for s in STATES})
ALL_STATES = {s["stid"] for s in STATES}
RETRY_ATTEMPTS = 4  # BCFY_RETRY_ATTEMPTS's default, which the ingest fixture keeps


def geo_kind(path: str) -> str | None:
    for kind in ("states", "counties"):
        if path.startswith(f"/common/v1/{kind}/"):
            return kind
    return None


class GeoRequests:
    """Wraps the simulator's API handler (each request runs on its own server thread): counts
    the geo list requests in flight, holds each until `limit` are in flight (or no more of its
    kind are coming) and a little longer, so that a request beyond the bound would be seen;
    and answers HTTP 500 to a path's first `fail[path]` requests."""

    def __init__(self, sim: FeedSimulator, limit: int, expected: dict[str, int]) -> None:
        self.limit = limit
        self.expected = expected
        self.fail: dict[str, int] = {}
        self.by_path: Counter[str] = Counter()
        self.arrived: Counter[str] = Counter()
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()
        answer = sim.handle_api

        def observed(method: str, path: str, query: Any, headers: Any, body: bytes) -> Any:
            kind = geo_kind(path)
            if kind is None:
                return answer(method, path, query, headers, body)
            with self._cond:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                self.arrived[kind] += 1
                self.by_path[path.rstrip("/")] += 1
                failing = self.fail.get(path.rstrip("/"), 0) >= self.by_path[path.rstrip("/")]
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: (
                        self.in_flight >= self.limit
                        or self.arrived[kind] >= self.expected.get(kind, 0)
                    ),
                    10,
                )
                self._cond.wait_for(lambda: self.in_flight > self.limit, 0.2)
            try:
                if failing:
                    page = b"<html><body><h1>500 Internal Server Error</h1></body></html>"
                    return _Answer(page, 500, "text/html")
                return answer(method, path, query, headers, body)
            finally:
                with self._cond:
                    self.in_flight -= 1
                    self._cond.notify_all()

        sim.handle_api = observed  # type: ignore[method-assign]  # this instance's route, wrapped


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_geo_concurrency_requests_are_in_flight(ingest, limit):
    ing = ingest
    ing.configure(GEO_CONCURRENCY=limit, GEO_COUNTRIES=",".join(map(str, COUNTRY_IDS)))
    seen = GeoRequests(ing.sim, limit, {"states": len(COUNTRY_IDS), "counties": len(ALL_STATES)})
    assert ing.refresh_geo() == "ok"
    assert seen.arrived == {"states": len(COUNTRY_IDS), "counties": len(ALL_STATES)}
    assert seen.peak <= limit, f"{seen.peak} geo requests in flight with GEO_CONCURRENCY={limit}"
    assert seen.peak == limit, "the bound is used, not one request at a time"
    stored = {c for (c,) in ing.sql("SELECT county_id FROM bcfy_counties")}
    assert stored == {c["ctid"] for c in COUNTIES if c["stid"] in ALL_STATES}


def us_counties(states: set[int]) -> set[int]:
    return {c["ctid"] for c in COUNTIES if c["stid"] in states}


@pytest.mark.parametrize("failures", [1, RETRY_ATTEMPTS - 1])
def test_a_county_list_answering_500_is_retried_and_stored(ingest, failures):
    ing = ingest
    seen = GeoRequests(ing.sim, 4, {"states": 1, "counties": len(US_STATES)})
    seen.fail["/common/v1/counties/17"] = failures
    assert ing.refresh_geo() == "ok"
    assert seen.by_path["/common/v1/counties/17"] == failures + 1
    stored = {c for (c,) in ing.sql("SELECT county_id FROM bcfy_counties")}
    assert stored == us_counties(US_STATES)
    assert ing.runs(GEO)[-1] == ("ok", None)


@pytest.mark.parametrize("failures", [RETRY_ATTEMPTS, 1_000_000])
def test_a_county_list_that_keeps_failing_is_the_runs_error_and_the_rest_is_stored(
    ingest, failures
):
    ing = ingest
    seen = GeoRequests(ing.sim, 4, {"states": 1, "counties": len(US_STATES)})
    seen.fail["/common/v1/counties/17"] = failures
    assert ing.refresh_geo() == "error"
    assert seen.by_path["/common/v1/counties/17"] == RETRY_ATTEMPTS, "retried, then given up"
    stored = {c for (c,) in ing.sql("SELECT county_id FROM bcfy_counties")}
    assert stored == us_counties(US_STATES - {17}), "every other state's counties are stored"
    assert {s for (s,) in ing.sql("SELECT state_id FROM bcfy_states")} == US_STATES
    (outcome, error) = ing.runs(GEO)[-1]
    assert outcome == "error"
    assert "GeoRefreshIncomplete" in error and "counties of state 17" in error
    assert "HTTP 500" in error
