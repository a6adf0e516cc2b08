"""Fixtures for the ingestion tests: a feed simulator, settings pointing at it, and the jobs run
in this process on real PostgreSQL and Redis.

    def test_x(ingest):                      # a simulator on the real clock
    def test_y(ingest_manual):               # a simulator and the API client on a ManualClock
        uuid = ingest.sim.add_playlist(calls_per_minute=60)
        ingest.follow(uuid)
        assert ingest.poll() == "ok"
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from psycopg.rows import dict_row

from tests.conftest import Services
from workers.core.runtime import Runtime
from workers.core.settings import reset_settings_cache
from workers.dev.procs import run_cli
from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator, ManualClock

if TYPE_CHECKING:
    from workers.clients.broadcastify import BroadcastifyClient
    from workers.core.jobs import JobContext, JobOutcome

KEY_ID = next(iter(DEMO_API_KEYS))
SECRET, APP_ID = DEMO_API_KEYS[KEY_ID]

# Tables the ingestion owns, emptied before each test.
TABLES = (
    "bcfy_calls_raw, bcfy_playlists, bcfy_playlist_poll_log, bcfy_calls_quarantine,"
    " bcfy_backfill, bcfy_countries, bcfy_states, bcfy_counties"
)


# The time of the records call_record makes.
NOW = 1_750_000_000
DROP: Any = object()  # a field call_record leaves out


def call_record(i: int = 0, **changes: Any) -> dict[str, Any]:
    """A valid call record as the live feed serves it (the i-th, a second after the one before),
    with `changes`; a field changed to DROP is left out."""
    base: dict[str, Any] = {
        "groupId": "2431-1001",
        "ts": NOW + i,
        "start_ts": NOW + i,
        "end_ts": NOW + i + 4,
        "duration": 3.6,
        "url": f"https://calls.example.org/2431/{NOW + i}-{i:05d}.m4a",
        "sid": 2431,
        "siteId": 1,
        "nodeId": 5012,
        "feedId": 21431,
        "tgId": 1001,
        "tag": 2,
        "freq": 851.0125,
        "src": 1234567,
        "descr": "Police Dispatch - District 1",
        "display": "PD Disp 1",
        "grouping": "Police",
        "size": 23456,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def api_env(sim: FeedSimulator) -> dict[str, str]:
    """The settings that point the Broadcastify client at the simulator, with its demo key."""
    return {k: v for k, v in sim.pipeline_env().items() if k.startswith("BCFY_")}


def follow_with_cli(env: dict[str, str], uuid: str) -> None:
    """Follow a playlist with `bcfy playlists add`, run as the operator runs it."""
    out = run_cli("playlists", "add", uuid, env=env)
    assert out.returncode == 0, out.stderr


@dataclass
class Ingest:
    services: Services
    sim: FeedSimulator
    clock: ManualClock | None
    monkeypatch: pytest.MonkeyPatch

    # --- settings ----------------------------------------------------------------------------

    def configure(self, **values: Any) -> None:
        """Set ingestion settings (by variable name) for the next job runs."""
        for name, value in values.items():
            self.monkeypatch.setenv(name, str(value))
        self.reset_runtime()

    def reset_runtime(self) -> None:
        Runtime.shutdown_current()
        reset_settings_cache()
        if self.clock is not None:
            Runtime.current().bcfy_api.clock = self.clock

    @property
    def api(self) -> BroadcastifyClient:
        return Runtime.current().bcfy_api

    # --- running the jobs in this process ----------------------------------------------------

    def poll(self) -> JobOutcome:
        from tasks.ingest.jobs import poll_followed_playlists

        outcome: JobOutcome = poll_followed_playlists.apply().get()
        return outcome

    def backfill(self) -> JobOutcome:
        from tasks.ingest.jobs import backfill_gaps

        outcome: JobOutcome = backfill_gaps.apply().get()
        return outcome

    def refresh_geo(self) -> JobOutcome:
        from tasks.geo.jobs import refresh_geo_data

        outcome: JobOutcome = refresh_geo_data.apply().get()
        return outcome

    def advance(self, seconds: float) -> None:
        assert self.clock is not None, "a ManualClock test"
        self.clock.advance(seconds)

    def poll_every_10s(self, times: int) -> None:
        """Poll `times` times, each an "ok" run, moving the ManualClock 10 s after each."""
        for _ in range(times):
            assert self.poll() == "ok"
            self.advance(10)

    # --- the database ------------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.services.db() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def follow(self, uuid: str, *, groups: list[str] | None = None) -> None:
        """Follow a playlist as `bcfy playlists add` does (its groups from playlist_get)."""
        from workers.cli.playlists import _add

        Runtime.current().run(_add(uuid))
        if groups is not None:
            import json

            self.sql(
                "UPDATE bcfy_playlists SET groups = %s::jsonb WHERE uuid = %s",
                json.dumps([{"groupId": g} for g in groups]),
                uuid,
            )

    def follow_a_quiet_playlist(self, polls: int = 1) -> str:
        """A new playlist with no calls of its own, followed and polled `polls` times (so that
        its cursor is set): calls published from here on are new. Returns its uuid."""
        uuid = self.sim.add_playlist(calls_per_minute=0)
        self.follow(uuid)
        self.poll_every_10s(polls)
        return uuid

    def stored_urls(self, uuid: str | None = None) -> list[str]:
        if uuid is None:
            return [u for (u,) in self.sql("SELECT url FROM bcfy_calls_raw ORDER BY id")]
        return [
            u
            for (u,) in self.sql(
                "SELECT url FROM bcfy_calls_raw WHERE playlist_uuid = %s ORDER BY id", uuid
            )
        ]

    def served_calls(self, uuid: str) -> list[dict[str, Any]]:
        """The playlist's calls the simulator has served at least once."""
        return [c for c in self.sim.calls(uuid) if self.sim.served_count(c) > 0]

    def cursor(self, uuid: str) -> int | None:
        rows = self.sql("SELECT cursor_pos FROM bcfy_playlists WHERE uuid = %s", uuid)
        pos: int | None = rows[0][0]
        return pos

    def polls(self, uuid: str | None = None) -> list[dict[str, Any]]:
        with self.services.db() as conn:
            cur = conn.cursor(row_factory=dict_row)
            cur.execute(
                "SELECT * FROM bcfy_playlist_poll_log"
                + (" WHERE playlist_uuid = %s" if uuid else "")
                + " ORDER BY id",
                (uuid,) if uuid else (),
            )
            return cur.fetchall()

    def runs(self, job: str) -> list[tuple[str, str | None]]:
        return [(r.outcome, r.error) for r in self.services.job_runs(job)]


def direct_context(job: str) -> JobContext:
    """The context of a job body called directly rather than through its task: this process's
    runtime, and a lock that is never taken, so never lost (as if on a host of its own)."""
    from workers.core.jobs import JobContext
    from workers.core.locks import SingletonLock

    rt = Runtime.current()
    return JobContext(job, rt.settings, rt, SingletonLock(rt.redis, job), triggered=True)


def _make(
    services: Services, monkeypatch: pytest.MonkeyPatch, clock: ManualClock | None
) -> Iterator[Ingest]:
    with services.db() as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
    sim = FeedSimulator(clock=clock, seed=7).start()
    env = {
        **api_env(sim),
        "BCFY_RETRY_BACKOFF_SEC": "0.05",
        "BCFY_RETRY_BACKOFF_MAX_SEC": "0.2",
        "LOCK_TTL_SEC": "10",
        "LOCK_RENEW_SEC": "2",
    }
    if clock is not None:
        # The clock is the test's: the 5 s rule is the simulator's, on that clock.
        env["INGEST_MIN_POLL_GAP_SEC"] = "0"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in list(os.environ):
        if name.startswith(("INGEST_", "GEO_", "BCFY_")) and name not in env:
            monkeypatch.delenv(name)
    ingest = Ingest(services, sim, clock, monkeypatch)
    ingest.reset_runtime()
    try:
        yield ingest
    finally:
        Runtime.shutdown_current()
        reset_settings_cache()
        sim.stop()


@pytest.fixture
def ingest(clean: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ingest]:
    yield from _make(clean, monkeypatch, None)


START = 1_750_000_000.0


@pytest.fixture
def ingest_manual(clean: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ingest]:
    yield from _make(clean, monkeypatch, ManualClock(START))
