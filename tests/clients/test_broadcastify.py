"""The API client over real HTTP against the simulator: its tokens, timeouts, retry policy and
the errors it raises."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import AsyncRetrying, RetryCallState

from workers.clients.broadcastify import (
    BroadcastifyClient,
    BroadcastifyError,
    ConfigurationError,
    Pace,
    TokenRejected,
    TransientError,
)
from workers.clients.retry_after import retry_after_sec
from workers.core.settings import load_settings
from workers.dev.services import free_port
from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator, ManualClock

KEY_ID = next(iter(DEMO_API_KEYS))
SECRET, APP_ID = DEMO_API_KEYS[KEY_ID]


@pytest.fixture
def sim() -> Iterator[FeedSimulator]:
    with FeedSimulator(seed=3) as simulator:
        simulator.faults.min_poll_interval = 0
        yield simulator


def client_for(
    base: str, clock: Callable[[], float] = time.time, **env: object
) -> tuple[BroadcastifyClient, httpx.AsyncClient]:
    settings = load_settings(
        {
            "BCFY_API_BASE": base,
            "BCFY_API_KEY_ID": KEY_ID,
            "BCFY_API_KEY": SECRET,
            "BCFY_APP_ID": APP_ID,
            "BCFY_RETRY_BACKOFF_SEC": "0.05",
            "BCFY_RETRY_BACKOFF_MAX_SEC": "0.2",
            **{k: str(v) for k, v in env.items()},
        }
    )
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=settings.services.http_connect_timeout_sec,
            read=settings.services.http_read_timeout_sec,
            write=settings.services.http_read_timeout_sec,
            pool=settings.services.http_connect_timeout_sec,
        )
    )
    return BroadcastifyClient.from_settings(settings, http, clock=clock), http


def run(
    base: str,
    call: Callable[[BroadcastifyClient], Awaitable[Any]],
    clock: Callable[[], float] = time.time,
    **env: object,
) -> tuple[Any, BroadcastifyClient]:
    """Make a client, await call(client), close it: (result or exception, client)."""

    async def go() -> tuple[Any, BroadcastifyClient]:
        api, http = client_for(base, clock, **env)
        try:
            try:
                return await call(api), api
            except Exception as exc:
                return exc, api
        finally:
            await http.aclose()

    return asyncio.run(go())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_750_000_000.5)


@pytest.fixture
def sim_on_clock(clock: ManualClock) -> Iterator[FeedSimulator]:
    with FeedSimulator(clock=clock, seed=3) as simulator:
        yield simulator


def test_the_token_is_the_services_hs256_jwt(sim_on_clock, clock, monkeypatch):
    sim = sim_on_clock
    seen = []
    real_send = BroadcastifyClient._send

    async def spy(self, method, path, params, data, token):
        seen.append(token)
        return await real_send(self, method, path, params, data, token)

    monkeypatch.setattr(BroadcastifyClient, "_send", spy)
    result, _ = run(sim.url, lambda api: api.countries(), clock, BCFY_JWT_LIFETIME_SEC=1800)
    assert isinstance(result, list) and result
    (token,) = seen
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": KEY_ID}
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"iss": APP_ID, "iat": 1_750_000_000, "exp": 1_750_001_800}


def test_the_token_is_cached_until_the_margin(sim_on_clock, clock):
    sim = sim_on_clock

    async def calls(api: BroadcastifyClient) -> list[int]:
        minted = []
        for step in (0, 100, 100, 100, 100):  # 0, 100, 200, 300, 400 s
            clock.advance(step)
            await api.countries()
            minted.append(api.tokens_minted)
        return minted

    minted, _ = run(sim.url, calls, clock, BCFY_JWT_LIFETIME_SEC=400, BCFY_JWT_RENEW_MARGIN_SEC=150)
    # Renewed once it is within 150 s of its 400 s: at 300 s, then again at 300 + 250.
    assert minted == [1, 1, 1, 2, 2]


def test_user_auth_adds_sub_and_utk(sim):
    uuid = sim.add_playlist(public=False, calls_per_minute=0)
    result, api = run(
        sim.url,
        lambda api: api.playlist_get(uuid),
        BCFY_USERNAME="demo",
        BCFY_PASSWORD="demo",
    )
    assert result["uuid"] == uuid and api._token is not None
    # (sub is an integer, as the service wants, not the string PyJWT checks for by default)
    claims = jwt.decode(api._token, SECRET, algorithms=["HS256"], options={"verify_sub": False})
    assert claims["sub"] == 1001 and isinstance(claims["utk"], str) and claims["utk"]
    refused, _ = run(
        sim.url,
        lambda api: api.playlist_get(uuid),
        BCFY_USERNAME="demo",
        BCFY_PASSWORD="wrong",
    )
    assert isinstance(refused, ConfigurationError) and "login as BCFY_USERNAME" in str(refused)
    assert "wrong" not in str(refused)


def test_concurrent_first_requests_share_one_login(sim):
    uuids = [sim.add_playlist(public=False, calls_per_minute=0) for _ in range(4)]
    sim.faults.latency = 0.2  # the login is still under way when the other requests start

    async def all_at_once(api: BroadcastifyClient) -> list[Any]:
        return await asyncio.gather(*(api.playlist_get(u) for u in uuids))

    result, _ = run(sim.url, all_at_once, BCFY_USERNAME="demo", BCFY_PASSWORD="demo")
    assert [r["uuid"] for r in result] == uuids
    assert sim.requests["auth"] == 1


def test_retry_after_as_an_http_date_is_honoured(sim):
    sim.faults.fail_next_429 = 1

    class DateRetry:
        def __str__(self) -> str:
            return email.utils.formatdate(time.time() + 2, usegmt=True)

    sim.faults.retry_after = DateRetry()  # the header is whatever str() gives
    started = time.monotonic()
    result, _ = run(sim.url, lambda api: api.countries())
    assert isinstance(result, list)
    assert time.monotonic() - started >= 1.0
    assert sim.requests["countries"] == 2


def test_retries_stop_at_the_attempt_bound(sim):
    sim.faults.fail_next_500 = 10
    result, _ = run(sim.url, lambda api: api.countries(), BCFY_RETRY_ATTEMPTS=3)
    assert isinstance(result, TransientError) and result.status == 500
    assert sim.requests["countries"] == 3


def test_no_attempt_starts_after_the_budget(sim):
    sim.faults.fail_next_429, sim.faults.retry_after = 10, 1
    result, _ = run(
        sim.url, lambda api: api.countries(), BCFY_RETRY_ATTEMPTS=10, BCFY_RETRY_BUDGET_SEC=2.5
    )
    assert isinstance(result, TransientError) and result.status == 429
    # Retry-After 1 s within a 2.5 s budget: the attempts the budget allows, not the ten the
    # attempt bound would (how long it took is not asserted: a loaded machine is slower).
    assert 2 <= sim.requests["countries"] <= 4


def test_a_retry_that_cannot_keep_the_gap_within_the_budget_is_not_sent(sim):
    uuid = sim.add_playlist(calls_per_minute=0)
    sim.faults.fail_next_500 = 1
    result, _ = run(
        sim.url,
        lambda api: api.live_calls(uuid, init=True),
        INGEST_MIN_POLL_GAP_SEC=3,
        BCFY_RETRY_BUDGET_SEC=2,
    )
    assert isinstance(result, TransientError) and result.status == 500
    assert len(sim.arrivals(f"playlist_uuid={uuid}")) == 1


def test_archive_reads_of_one_group_keep_the_gap(sim):
    uuid = sim.add_playlist(calls_per_minute=0)
    group = sim.publish_call(uuid)["groupId"]
    sim.faults.fail_next_429, sim.faults.retry_after = 1, 0
    now = int(time.time())

    async def two_windows(api: BroadcastifyClient) -> list[Any]:
        first = await api.group_archives(group, now - 7200, now - 3601)
        second = await api.group_archives(group, now - 3600, now)
        return [first, second]

    result, _ = run(sim.url, two_windows, INGEST_MIN_POLL_GAP_SEC=1)
    assert [status for status, _ in result] == [200, 200]
    arrivals = sim.arrivals(f"group={group}")
    assert len(arrivals) == 3  # a 429, its retry, the next window
    assert all(b - a >= 1 for a, b in itertools.pairwise(arrivals))


_UNUSED_HTTP = httpx.AsyncClient()  # never sends: only the client's memory is read

_RETRY_AFTER = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(min_value=-1e6, max_value=1e10).map(
        lambda t: email.utils.formatdate(time.time() + t, usegmt=True)
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    header=_RETRY_AFTER,
    gap=st.floats(min_value=0, max_value=30),
    since_last=st.one_of(st.none(), st.floats(min_value=0, max_value=60)),
    attempt=st.integers(min_value=1, max_value=6),
    budget=st.floats(min_value=0, max_value=120),
)
def test_a_retry_never_waits_less_than_the_gap_or_retry_after(
    header: str | None, gap: float, since_last: float | None, attempt: int, budget: float
) -> None:
    env = {
        "INGEST_MIN_POLL_GAP_SEC": str(gap),
        "INGEST_INTERVAL_SEC": str(gap + 1),
        "BCFY_RETRY_BUDGET_SEC": str(budget),
        "BCFY_RETRY_BACKOFF_SEC": "0.05",
        "BCFY_RETRY_BACKOFF_MAX_SEC": "0.2",
    }
    api = BroadcastifyClient.from_settings(load_settings(env), _UNUSED_HTTP)  # _wait sends nothing
    pace = Pace("playlist_uuid=x")
    if since_last is not None:
        api._last_request_end[pace.key] = time.monotonic() - since_last
    retry_after = retry_after_sec(header)
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    failure = TransientError("429", status=429, retry_after=retry_after)
    state.set_exception((TransientError, failure, None))
    wait = api._wait(state, pace)
    assert 0 <= wait < float("inf")
    if since_last is not None:
        assert wait >= gap - since_last - 0.5  # what was left of the gap (the clock moved on)
    if retry_after is not None:
        assert wait >= min(retry_after, api.retry_budget_sec)


def test_a_slow_answer_times_out_and_is_retried(sim):
    sim.faults.latency = 1.5
    result, _ = run(
        sim.url,
        lambda api: api.countries(),
        HTTP_TOTAL_TIMEOUT_SEC=0.5,
        HTTP_READ_TIMEOUT_SEC=0.5,
        BCFY_RETRY_ATTEMPTS=2,
    )
    assert isinstance(result, TransientError) and "timed out" in str(result)
    assert sim.requests["countries"] == 2


def test_a_refused_connection_is_retried_then_reported():
    port = free_port()  # nothing listens there
    result, _ = run(f"http://127.0.0.1:{port}", lambda api: api.countries(), BCFY_RETRY_ATTEMPTS=2)
    assert isinstance(result, TransientError) and "ConnectError" in str(result)


def test_a_4xx_is_an_error_and_not_retried(sim):
    async def call(api: BroadcastifyClient) -> Any:
        return await api.request("GET", "/calls/v1/no_such_method")

    result, _ = run(sim.url, call)
    assert isinstance(result, BroadcastifyError) and not isinstance(result, TransientError)
    assert result.status == 404


def test_error_103_twice_is_token_rejected(sim):
    sim.faults.error_in_200, sim.faults.error_in_200_code = 2, 103
    result, api = run(sim.url, lambda api: api.countries())
    assert isinstance(result, TokenRejected) and api.tokens_minted == 2
    assert sim.requests["countries"] == 2


def test_error_108_is_a_configuration_error_and_held(sim):
    async def twice(api: BroadcastifyClient) -> list[Any]:
        out = []
        for _ in range(2):
            try:
                await api.countries()
            except ConfigurationError as exc:
                out.append(exc)
        return out

    errors, _ = run(sim.url, twice, BCFY_API_KEY_ID="unknown")
    assert len(errors) == 2 and all("BCFY_API_KEY_ID" in str(e) for e in errors)
    assert sim.requests["countries"] == 1, "the second call was not sent"


def test_live_calls_needs_a_cursor_or_init():
    async def call(api: BroadcastifyClient) -> Any:
        return await api.live_calls("x")

    result, _ = run("http://127.0.0.1:9", call)
    assert isinstance(result, ValueError)
