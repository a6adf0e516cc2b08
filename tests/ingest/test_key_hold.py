"""Error 108 (unknown key id): the key is not sent again for five minutes, and then it is.

The hold is timed by the API client's clock, which these tests move (a ManualClock shared with
the simulator), so five minutes pass without waiting for them. The service's 108 is injected
once (`error_in_200`), as a glitch of the service's would be: once the hold ends, the next poll
sends the key again and gets its calls."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from workers.clients.broadcastify import (
    CONFIG_ERROR_HOLD_SEC,
    BroadcastifyClient,
    ConfigurationError,
)
from workers.core.settings import load_settings
from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator, ManualClock

POLL = "tasks.ingest.poll_followed_playlists"
KEY_ID = next(iter(DEMO_API_KEYS))
SECRET, APP_ID = DEMO_API_KEYS[KEY_ID]


def test_the_hold_after_error_108_is_five_minutes_and_then_ends(ingest_manual):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.follow(uuid)
    ing.advance(10)
    assert ing.poll() == "ok"  # the init poll: the key works
    sent = ing.sim.requests["live"]

    ing.sim.faults.error_in_200, ing.sim.faults.error_in_200_code = 1, 108
    ing.advance(10)
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == sent + 1
    assert "BCFY_API_KEY_ID" in ing.runs(POLL)[-1][1] and "108" in ing.runs(POLL)[-1][1]

    record = ing.sim.publish_call(uuid)
    ing.advance(CONFIG_ERROR_HOLD_SEC - 1)  # 1 s short of the hold: still held
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == sent + 1, "the key was sent again within five minutes"
    assert "BCFY_API_KEY_ID" in ing.runs(POLL)[-1][1]
    assert ing.stored_urls(uuid) == []

    ing.advance(2)  # the hold is over: the next poll sends the key again
    assert ing.poll() == "ok"
    assert ing.sim.requests["live"] == sent + 2, "the hold never ended"
    assert ing.stored_urls(uuid) == [record["url"]]


def test_the_client_holds_exactly_the_five_minutes():
    clock = ManualClock(1_750_000_000.0)
    with FeedSimulator(seed=3, clock=clock) as sim:
        sim.faults.min_poll_interval = 0
        settings = load_settings(
            {
                "BCFY_API_BASE": sim.url,
                "BCFY_API_KEY_ID": KEY_ID,
                "BCFY_API_KEY": SECRET,
                "BCFY_APP_ID": APP_ID,
            }
        )

        async def scenario() -> list[str]:
            outcomes = []
            async with httpx.AsyncClient(timeout=10) as http:
                api = BroadcastifyClient.from_settings(settings, http, clock=clock)
                sim.faults.error_in_200, sim.faults.error_in_200_code = 1, 108
                for step in (0.0, CONFIG_ERROR_HOLD_SEC - 0.5, 0.5):
                    clock.advance(step)
                    try:
                        await api.countries()
                        outcomes.append(f"ok after {sim.requests['countries']} requests")
                    except ConfigurationError as exc:
                        assert "BCFY_API_KEY_ID" in str(exc)
                        outcomes.append(f"held after {sim.requests['countries']} requests")
            return outcomes

        assert asyncio.run(scenario()) == [
            "held after 1 requests",  # the 108 itself
            "held after 1 requests",  # 299.5 s later: not asked
            "ok after 2 requests",  # 300 s after the 108: asked again
        ]


@pytest.mark.parametrize("back", [60.0, 3600.0])
def test_a_clock_stepped_back_does_not_stretch_the_hold(back):
    """The hold runs on the wall clock (the client's); a clock stepped back (NTP) ends it
    rather than holding the key for as long as the step plus five minutes."""
    now = [1_750_000_000.0]
    settings = load_settings(
        {
            "BCFY_API_BASE": "http://127.0.0.1:9",
            "BCFY_API_KEY_ID": KEY_ID,
            "BCFY_API_KEY": SECRET,
            "BCFY_APP_ID": APP_ID,
        }
    )
    api = BroadcastifyClient.from_settings(
        settings, httpx.AsyncClient(), clock=lambda: now[0]
    )  # never sends
    api._config_error = (now[0], "the service does not know BCFY_API_KEY_ID")
    assert api._config_error_held()
    now[0] -= back
    assert not api._config_error_held()
