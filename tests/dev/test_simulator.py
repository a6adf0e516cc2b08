"""The feed simulator, over real HTTP: tokens checked as the service does, positions that give
every call exactly once, billing, fault switches, audio faults, geo data, `bcfy sim`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jwt
import numpy as np
import pytest

from workers.audio.codec import AudioDecodeError, decode_mono, probe
from workers.dev.procs import ROOT, wait_until
from workers.dev.services import free_port
from workers.dev.simulator import (
    DEMO_API_KEYS,
    DEMO_USERS,
    OMIT,
    AudioFault,
    FeedSimulator,
    ManualClock,
)
from workers.dev.simulator.audio import load_clips

KID = "demo-key"
SECRET, APP_ID = DEMO_API_KEYS[KID]
START = 1_700_000_000.25  # a quarter past a whole second: boundaries are not all aligned


def token(now: float, *, kid=KID, secret=SECRET, lifetime=3600, drop=(), headers=None, **claims):
    payload = {"iss": APP_ID, "iat": int(now), "exp": int(now) + lifetime, **claims}
    for name in drop:
        payload.pop(name)
    head = {"kid": kid, **(headers or {})}
    if kid is None:
        head.pop("kid")
    return jwt.encode(payload, secret, algorithm="HS256", headers=head)


class Api:
    """An httpx client that mints a fresh token on the simulator's clock for every request."""

    def __init__(self, sim: FeedSimulator, **claims) -> None:
        self.sim, self.claims = sim, claims
        self.http = httpx.Client(base_url=sim.url, timeout=30)

    def get(self, path: str, **params) -> httpx.Response:
        auth = {"Authorization": f"Bearer {token(self.sim.clock(), **self.claims)}"}
        return self.http.get(path, params=params, headers=auth)

    def json(self, path: str, **params) -> dict:
        response = self.get(path, **params)
        assert response.status_code == 200, response.text
        body: dict = response.json()
        return body

    def live(self, uuid: str, **params) -> dict:
        return self.json("/calls/v1/live/", playlist_uuid=uuid, **params)


def error_code(response: httpx.Response) -> int:
    code: int = response.json()["errors"][0]["code"]
    return code


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
def fsim(clock):
    with FeedSimulator(clock=clock, seed=7) as simulator:
        yield simulator


@pytest.fixture
def api(fsim):
    client = Api(fsim)
    yield client
    client.http.close()


def urls(calls: list[dict]) -> list[str]:
    return [c["url"] for c in calls]


def publish_every(fsim, clock, uuid: str, n: int, seconds: float) -> list[dict]:
    """Publish `n` calls on the playlist, one every `seconds` of the fake clock."""
    published = []
    for _ in range(n):
        published.append(fsim.publish_call(uuid))
        clock.advance(seconds)
    return published


# --- tokens --------------------------------------------------------------------------------


def test_a_good_token_is_accepted(fsim, api):
    assert api.json("/common/v1/countries")["countries"]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda now: token(now, kid="no-such-key"), 108),
        (lambda now: token(now, kid=None), 108),
        (lambda now: token(now, secret="another-secret-of-thirty-two-bytes!!"), 103),
        (lambda now: token(now, iss="another-app"), 103),
        (lambda now: token(now, drop=["exp"]), 103),
        (lambda now: token(now, lifetime=-10), 103),
        (lambda now: token(now, lifetime=24 * 3600 + 60), 103),
        (lambda now: token(now, drop=["iat"]), 103),
        (lambda now: token(now, drop=["iss"]), 103),
        (lambda now: token(now)[:-4] + "AAAA", 103),  # tampered signature
        (lambda now: "not.a.jwt", 103),
        (lambda now: token(now, sub=1001), 103),  # sub without utk
    ],
    ids=[
        "unknown-kid",
        "no-kid",
        "bad-signature",
        "wrong-iss",
        "no-exp",
        "expired",
        "over-24h",
        "no-iat",
        "no-iss",
        "tampered",
        "garbage",
        "sub-without-utk",
    ],
)
def test_bad_tokens_get_the_service_error_codes_in_a_200(fsim, clock, make, code):
    response = httpx.get(
        f"{fsim.url}/common/v1/countries", headers={"Authorization": f"Bearer {make(clock())}"}
    )
    assert response.status_code == 200
    assert error_code(response) == code
    assert "countries" not in response.json()


def test_an_unsigned_token_is_refused(fsim, clock):
    unsigned = jwt.encode(
        {"iss": APP_ID, "iat": int(clock()), "exp": int(clock()) + 60},
        None,
        algorithm="none",
        headers={"kid": KID},
    )
    response = httpx.get(
        f"{fsim.url}/common/v1/countries", headers={"Authorization": f"Bearer {unsigned}"}
    )
    assert error_code(response) == 103


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Token abc"])
def test_a_missing_or_garbled_authorization_header_is_a_401(fsim, header):
    headers = {} if header is None else {"Authorization": header}
    response = httpx.get(f"{fsim.url}/calls/v1/playlists_public", headers=headers)
    assert response.status_code == 401
    assert error_code(response) == 103


def test_expiry_is_judged_by_the_simulators_clock(fsim, clock):
    good = token(clock(), lifetime=600)
    headers = {"Authorization": f"Bearer {good}"}
    assert httpx.get(f"{fsim.url}/common/v1/countries", headers=headers).status_code == 200
    assert "errors" not in httpx.get(f"{fsim.url}/common/v1/countries", headers=headers).json()
    clock.advance(601)
    assert error_code(httpx.get(f"{fsim.url}/common/v1/countries", headers=headers)) == 103


def test_a_user_login_opens_non_public_playlists(fsim, clock, api):
    private = fsim.add_playlist(name="Private", public=False)
    assert error_code(api.get("/calls/v1/live/", playlist_uuid=private, init=1)) == 403
    assert error_code(api.get("/calls/v1/playlist_get/", uuid=private)) == 403
    public_uuids = [p["uuid"] for p in api.json("/calls/v1/playlists_public")["playlists"]]
    assert private not in public_uuids

    user, (password, uid) = next(iter(DEMO_USERS.items()))
    auth = {"Authorization": f"Bearer {token(clock())}"}
    bad = httpx.post(
        f"{fsim.url}/common/v1/auth", data={"username": user, "password": "wrong"}, headers=auth
    )
    assert error_code(bad) == 401
    login = httpx.post(
        f"{fsim.url}/common/v1/auth", data={"username": user, "password": password}, headers=auth
    ).json()
    assert login["uid"] == uid and login["token"]

    as_user = Api(fsim, sub=login["uid"], utk=login["token"])
    assert as_user.live(private, init=1)["calls"] == []
    assert as_user.json("/calls/v1/playlist_get/", uuid=private)["public"] is False
    forged = Api(fsim, sub=login["uid"], utk="0" * 32)
    assert error_code(forged.get("/calls/v1/live/", playlist_uuid=private, init=1)) == 103


# --- live: positions, billing ------------------------------------------------------------------


def test_init_gives_the_last_25_calls_oldest_first(fsim, clock, api):
    uuid = fsim.add_playlist()
    published = publish_every(fsim, clock, uuid, 40, 1.5)
    answer = api.live(uuid, init=1)
    assert urls(answer["calls"]) == urls(published[-25:])
    assert answer["lastPos"] == math.floor(clock()) - 1
    assert answer["serverTime"] == math.floor(clock())
    assert fsim.billed_records == 25


def test_a_call_is_not_served_before_its_second_is_complete(fsim, clock, api):
    uuid = fsim.add_playlist()
    cursor = api.live(uuid, init=1)["lastPos"] or math.floor(clock()) - 1
    clock.advance(5)
    call = fsim.publish_call(uuid)
    early = api.live(uuid, pos=cursor)
    assert early["calls"] == [] and early["lastPos"] == 0
    clock.advance(5)
    assert urls(api.live(uuid, pos=cursor)["calls"]) == [call["url"]]


def test_polling_with_the_last_lastpos_serves_every_call_exactly_once(fsim, clock, api):
    """The generator publishes about 12 calls a minute; a client polls every 5-15 s (fractional
    steps, so calls and polls land anywhere within their seconds) and keeps its cursor through
    lastPos 0. It receives every call exactly once, in order, and pays for each once."""
    uuid = fsim.add_playlist(calls_per_minute=12)
    steps = random.Random(3)
    answer = api.live(uuid, init=1)
    received = list(answer["calls"])
    cursor = answer["lastPos"] or None
    zero_answers = 0
    for n in range(120):
        clock.advance(steps.uniform(5.01, 15))
        if n % 10 == 0:
            fsim.publish_call(uuid)  # by hand too, at the same moment as a poll
        if cursor is None:
            answer = api.live(uuid, init=1)
        else:
            answer = api.live(uuid, pos=cursor)
        received += answer["calls"]
        if answer["lastPos"]:
            assert cursor is None or answer["lastPos"] >= cursor
            cursor = answer["lastPos"]
        else:
            zero_answers += 1
    clock.advance(6)
    received += api.live(uuid, pos=cursor)["calls"]

    published = fsim.calls(uuid)
    assert len(published) > 150
    assert zero_answers > 0, "some polls were empty: the lastPos 0 quirk was exercised"
    assert urls(received) == urls(published)
    assert len(set(urls(received))) == len(received)
    assert fsim.billed_records == len(received)
    assert {fsim.served_count(c) for c in published} == {1}


def test_the_generator_is_driven_by_the_clock_and_the_seed(clock):
    def run() -> list[tuple]:
        manual = ManualClock(START)
        with FeedSimulator(clock=manual, seed=11) as sim:
            uuid = sim.add_playlist(calls_per_minute=12)
            manual.advance(600)
            return [(c["groupId"], c["ts"], c["duration"]) for c in sim.calls(uuid)]

    first, second = run(), run()
    assert first == second
    assert 60 <= len(first) <= 180, "about 12 a minute for 10 minutes"
    assert all(START <= ts <= START + 600 for _, ts, _ in first)
    assert [ts for _, ts, _ in first] == sorted(ts for _, ts, _ in first)


def test_lastpos_is_zero_on_an_empty_answer_unless_switched_off(fsim, clock, api):
    uuid = fsim.add_playlist()
    fsim.publish_call(uuid)
    clock.advance(2)
    cursor = api.live(uuid, init=1)["lastPos"]
    assert cursor == math.floor(clock()) - 1
    clock.advance(10)
    assert api.live(uuid, pos=cursor) == {
        "serverTime": math.floor(clock()),
        "lastPos": 0,
        "calls": [],
    }
    fsim.faults.lastpos_zero_on_empty = False
    clock.advance(10)
    assert api.live(uuid, pos=cursor)["lastPos"] == math.floor(clock()) - 1
    assert fsim.billed_records == 1


@pytest.mark.parametrize(
    "params",
    [
        {"groups": "2431-1001"},
        {"sid": "2431"},
        {"nodeId": "5012"},
    ],
)
def test_two_selectors_are_rejected(fsim, api, params):
    uuid = fsim.add_playlist()
    response = api.get("/calls/v1/live/", playlist_uuid=uuid, init=1, **params)
    assert error_code(response) == 400


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"pos": "12", "init": "1"},
        {"pos": "soon"},
        {"pos": "-5"},
        {"pos": "¹²"},
        {"pos": "9" * 5000},
        {"init": "yes"},
        {"cursor": "12"},
    ],
    ids=[
        "no-selector",
        "pos-and-init",
        "pos-not-a-number",
        "negative-pos",
        "superscript-pos",
        "5000-digit-pos",
        "init-not-1",
        "typo",
    ],
)
def test_malformed_live_requests_are_rejected(fsim, api, params):
    uuid = fsim.add_playlist()
    selector = {} if not params else {"playlist_uuid": uuid}
    assert error_code(api.get("/calls/v1/live/", **selector, **params)) == 400


def test_unknown_playlists_are_not_found(fsim, api):
    missing = "00000000-0000-4000-8000-000000000000"
    assert error_code(api.get("/calls/v1/live/", playlist_uuid=missing, init=1)) == 404
    assert error_code(api.get("/calls/v1/playlist_get/", uuid=missing)) == 404


def test_other_selectors_pick_their_calls(fsim, clock, api):
    chicago = fsim.add_playlist(groups=["2431-1001", "2431-2001"])
    new_york = fsim.add_playlist(groups=["8109-1001"])
    a = fsim.publish_call(chicago, group_id="2431-1001")
    b = fsim.publish_call(chicago, group_id="2431-2001")
    c = fsim.publish_call(new_york)
    clock.advance(2)
    by_groups = api.json("/calls/v1/live/", groups="2431-2001,8109-1001", init=1)
    assert urls(by_groups["calls"]) == [b["url"], c["url"]]
    assert urls(api.json("/calls/v1/live/", sid="2431", init=1)["calls"]) == [a["url"], b["url"]]
    assert urls(api.json("/calls/v1/live/", nodeId="6027", init=1)["calls"]) == [c["url"]]


def test_polling_one_selector_faster_than_every_5_s_is_refused(fsim, clock, api):
    uuid = fsim.add_playlist()
    api.live(uuid, init=1)
    clock.advance(3.2)
    fsim.publish_call(uuid)
    clock.advance(1)
    too_soon = api.get("/calls/v1/live/", playlist_uuid=uuid, pos=1)
    assert too_soon.status_code == 429
    assert too_soon.headers["Retry-After"] == "1"
    assert fsim.billed_records == 0
    clock.advance(1)
    assert len(api.live(uuid, pos=1)["calls"]) == 1
    other = fsim.add_playlist()
    assert api.live(other, init=1)["calls"] == [], "another selector has its own pace"


def test_a_cursorless_poll_rereads_the_last_5_minutes_and_is_billed_again(fsim, clock, api):
    uuid = fsim.add_playlist()
    published = publish_every(fsim, clock, uuid, 20, 30)

    def last_5_minutes() -> list[dict]:
        window_start = math.floor(clock()) - 1 - 300
        return [c for c in published if c["ts"] > window_start]

    first = last_5_minutes()
    assert 0 < len(first) < len(published)
    assert urls(api.live(uuid)["calls"]) == urls(first)
    clock.advance(5)
    second = last_5_minutes()
    assert urls(api.live(uuid)["calls"]) == urls(second)
    assert fsim.billed_records == len(first) + len(second)
    assert {fsim.served_count(c) for c in second} == {2}


def test_max_pos_age_answers_an_old_pos_only_with_recent_calls(fsim, clock, api):
    uuid = fsim.add_playlist(groups=["2431-1001"])
    cursor = math.floor(clock()) - 1
    published = publish_every(fsim, clock, uuid, 10, 60)
    fsim.faults.max_pos_age = 150
    horizon = math.floor(clock() - 150)
    kept = [c for c in published if c["ts"] > horizon]
    assert 0 < len(kept) < len(published)
    answer = api.live(uuid, pos=cursor)
    assert urls(answer["calls"]) == urls(kept)
    assert answer["lastPos"] == math.floor(clock()) - 1
    assert fsim.billed_records == len(kept)
    # The archive still has what the live endpoint no longer answers for.
    first_ts = published[0]["ts"]
    archived = api.json(f"/calls/v1/group_archives/2431-1001/{first_ts}/{horizon}")["calls"]
    assert urls(archived) == urls([c for c in published if c["ts"] <= horizon])


def test_reserve_overlap_reserves_the_previous_answer_and_bills_it(fsim, clock, api):
    uuid = fsim.add_playlist()
    fsim.faults.reserve_overlap = True
    a = fsim.publish_call(uuid)
    clock.advance(2)
    first = api.live(uuid, init=1)
    assert urls(first["calls"]) == [a["url"]]
    b = fsim.publish_call(uuid)
    clock.advance(6)
    second = api.live(uuid, pos=first["lastPos"])
    assert urls(second["calls"]) == [a["url"], b["url"]]
    assert fsim.billed_records == 3
    assert (fsim.served_count(a), fsim.served_count(b)) == (2, 1)


def test_duplicate_group_ts_makes_a_twin_with_its_own_url(fsim, clock, api):
    uuid = fsim.add_playlist()
    fsim.faults.duplicate_group_ts = 1
    call = fsim.publish_call(uuid)
    single = fsim.publish_call(uuid)
    clock.advance(2)
    served = api.live(uuid, init=1)["calls"]
    assert len(served) == 3
    twin = served[1]
    assert (twin["groupId"], twin["ts"]) == (call["groupId"], call["ts"])
    assert twin["url"] != call["url"]
    assert served[2]["url"] == single["url"]
    assert (fsim.served_count(call), fsim.served_count(twin)) == (1, 1)
    assert fsim.faults.duplicate_group_ts == 0


def test_a_page_of_1000_calls_comes_back_whole(fsim, clock, api):
    uuid = fsim.add_playlist()
    for _ in range(1000):
        fsim.publish_call(uuid)
    clock.advance(2)
    calls = api.live(uuid, pos=1)["calls"]
    assert len(calls) == 1000 and len(set(urls(calls))) == 1000
    assert fsim.billed_records == 1000


# --- call records --------------------------------------------------------------------------


def test_call_records_carry_every_documented_field_with_its_type(fsim, clock, api):
    uuid = fsim.add_playlist()
    for _ in range(20):
        fsim.publish_call(uuid)
    clock.advance(2)
    types = {
        "groupId": str,
        "ts": int,
        "start_ts": int,
        "end_ts": int,
        "duration": float,
        "url": str,
        "sid": int,
        "siteId": int,
        "nodeId": int,
        "feedId": int,
        "tgId": int,
        "tag": int,
        "freq": float,
        "src": int,
        "descr": str,
        "display": str,
        "grouping": str,
        "size": int,
    }
    clips, _silence = load_clips()
    for call in api.live(uuid, init=1)["calls"]:
        assert {k: type(v) for k, v in call.items()} == types
        assert re.fullmatch(r"\d+-\d+|c-\d+", call["groupId"])
        assert call["start_ts"] == call["ts"] < call["end_ts"]
        assert call["url"].startswith(f"{fsim.url}/audio/") and call["url"].endswith(".m4a")
        assert (call["duration"], call["size"]) in {(c.duration, c.size) for c in clips}


def test_fields_can_be_overridden_or_left_out(fsim, clock, api):
    uuid = fsim.add_playlist()
    fsim.publish_call(uuid, url=OMIT, duration=-3.0, descr="x" * 5000, extra="kept")
    clock.advance(2)
    [call] = api.live(uuid, init=1)["calls"]
    assert "url" not in call
    assert call["duration"] == -3.0 and len(call["descr"]) == 5000 and call["extra"] == "kept"


# --- other calls methods --------------------------------------------------------------------


def test_group_archives_answer_a_window_of_at_most_8_hours(fsim, clock, api):
    uuid = fsim.add_playlist(groups=["2431-1001", "2431-1002"])
    published = []
    for n in range(12):
        published.append(fsim.publish_call(uuid, group_id="2431-1001"))
        fsim.publish_call(uuid, group_id="2431-1002")
        clock.advance(600 + n)
    start, end = published[3]["ts"], published[8]["ts"]
    answer = api.json(f"/calls/v1/group_archives/2431-1001/{start}/{end}")
    assert urls(answer["calls"]) == urls(published[3:9]), "both ends inclusive, one group"
    assert fsim.billed_records == 6
    too_long = api.get(f"/calls/v1/group_archives/2431-1001/{start}/{start + 28_801}")
    assert error_code(too_long) == 400
    assert api.json(f"/calls/v1/group_archives/2431-1001/{start}/{start + 28_800}")["calls"]
    assert error_code(api.get(f"/calls/v1/group_archives/2431-1001/{end}/{start}")) == 400
    assert error_code(api.get(f"/calls/v1/group_archives/2431-1001/{start}/later")) == 400
    assert error_code(api.get(f"/calls/v1/group_archives/9999-1/{start}/{end}")) == 404


def test_an_archived_call_with_an_explicit_ts_is_found_by_it(fsim, clock, api):
    uuid = fsim.add_playlist(groups=["c-4242"])
    late = fsim.publish_call(uuid, ts=int(START) - 3600)
    assert late["ts"] == int(START) - 3600
    window = f"{int(START) - 4000}/{int(START) - 3000}"
    assert urls(api.json(f"/calls/v1/group_archives/c-4242/{window}")["calls"]) == [late["url"]]
    clock.advance(2)
    assert urls(api.live(uuid, pos=int(START) - 1)["calls"]) == [late["url"]], "a late upload"


def test_playlist_group_and_node_metadata(fsim, api):
    uuid = fsim.add_playlist(name="Chicago", groups=["2431-1001", "c-21432"], ctids=[578])
    playlist = api.json("/calls/v1/playlist_get/", uuid=uuid)
    assert (playlist["uuid"], playlist["name"], playlist["public"]) == (uuid, "Chicago", True)
    assert playlist["ctids"] == [578] and isinstance(playlist["listeners"], int)
    assert [g["groupId"] for g in playlist["groups"]] == ["2431-1001", "c-21432"]
    assert playlist["descr"]
    public = api.json("/calls/v1/playlists_public")["playlists"]
    assert [p["uuid"] for p in public] == [uuid]
    assert set(public[0]) == {"uuid", "name", "descr", "ctids", "listeners"}
    group = api.json("/calls/v1/group_get/2431-1001")
    assert (group["sid"], group["tgId"], group["display"]) == (2431, 1001, "PD Disp 1")
    node = api.json(f"/calls/v1/node_get/{group['nodeId']}")
    assert node["sid"] == 2431 and node["name"]
    assert error_code(api.get("/calls/v1/group_get/1-2")) == 404
    assert error_code(api.get("/calls/v1/node_get/77")) == 404
    assert error_code(api.get("/calls/v1/nothing_here")) == 404


# --- injected faults -----------------------------------------------------------------------


def test_429_with_retry_after_then_normal_answers(fsim, clock, api):
    uuid = fsim.add_playlist()
    fsim.publish_call(uuid)
    clock.advance(2)
    fsim.faults.fail_next_429, fsim.faults.retry_after = 2, 7
    for _ in range(2):
        response = api.get("/calls/v1/live/", playlist_uuid=uuid, init=1)
        assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert fsim.billed_records == 0
    assert len(api.live(uuid, init=1)["calls"]) == 1


def test_500_error_in_200_and_malformed_json_each_fire_as_often_as_asked(fsim, api):
    fsim.faults.fail_next_500 = 1
    assert api.get("/common/v1/countries").status_code == 500
    fsim.faults.error_in_200, fsim.faults.error_in_200_code = 2, 108
    for _ in range(2):
        response = api.get("/common/v1/countries")
        assert response.status_code == 200 and error_code(response) == 108
    fsim.faults.malformed_json_next = 1
    garbled = api.get("/common/v1/countries")
    assert garbled.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbled.json()
    assert api.json("/common/v1/countries")["countries"]


def test_latency_delays_every_api_answer(fsim, api):
    fsim.faults.latency = 0.4
    started = time.monotonic()
    api.json("/common/v1/countries")
    assert time.monotonic() - started >= 0.4

    # Cleared, it delays nothing more: an answer asked for then overtakes one still held by
    # a long latency (an order, not a speed: how fast the simulator answers is bench/'s).
    fsim.faults.latency = 8
    held, order = Api(fsim), []
    slow = threading.Thread(
        target=lambda: order.append(("held", held.json("/common/v1/countries")))
    )
    slow.start()
    try:
        wait_until(lambda: fsim.requests["countries"] == 2, 30, "the held request to arrive")
        time.sleep(0.5)  # it has read the latency and is waiting out its 8 s
        fsim.faults.latency = 0
        order.append(("cleared", api.json("/common/v1/countries")))
    finally:
        slow.join(60)
        held.http.close()
    assert [name for name, _ in order] == ["cleared", "held"]
    assert all(answer["countries"] for _, answer in order)


# --- audio ---------------------------------------------------------------------------------


def publish_with_audio(sim: FeedSimulator, clock, fault: AudioFault) -> dict:
    uuid = sim.add_playlist()
    return sim.publish_call(uuid, audio=fault)


def test_ok_audio_is_the_spoken_clip_the_record_describes(fsim, clock, tmp_path):
    uuid = fsim.add_playlist()
    first, second = fsim.publish_call(uuid), fsim.publish_call(uuid)
    for call in (first, second):
        response = httpx.get(call["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mp4"
        assert len(response.content) == call["size"]
        path = tmp_path / "call.m4a"
        path.write_bytes(response.content)
        info = probe(path)
        assert info.codec == "aac" and info.channels == 1
        assert info.duration_sec == pytest.approx(call["duration"], abs=0.1)
    assert first["size"] != second["size"], "consecutive calls get different clips"


def test_truncated_audio_does_not_decode_whole(fsim, clock, tmp_path):
    call = publish_with_audio(fsim, clock, AudioFault.TRUNCATED)
    response = httpx.get(call["url"])
    assert response.status_code == 200
    assert len(response.content) == int(call["size"] * 0.4)
    path = tmp_path / "cut.m4a"
    path.write_bytes(response.content)
    try:
        decoded = probe(path).duration_sec
    except AudioDecodeError:
        decoded = 0.0
    assert decoded < call["duration"] * 0.5


def test_missing_and_wrong_type_audio(fsim, clock):
    assert httpx.get(publish_with_audio(fsim, clock, AudioFault.MISSING)["url"]).status_code == 404
    page = httpx.get(publish_with_audio(fsim, clock, AudioFault.WRONG_TYPE)["url"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"<html>" in page.content
    assert httpx.get(f"{fsim.url}/audio/0000000-ffff.m4a").status_code == 404


@pytest.mark.parametrize("fault", [AudioFault.OVERSIZE, AudioFault.OVERSIZE_UNDECLARED])
def test_oversize_audio_streams_30_mb_and_more(fsim, clock, fault):
    call = publish_with_audio(fsim, clock, fault)
    total = 0
    with httpx.stream("GET", call["url"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mp4"
        declared = response.headers.get("content-length")
        if fault is AudioFault.OVERSIZE:
            assert int(declared) == fsim.faults.oversize_bytes
        else:
            assert declared is None and response.headers["transfer-encoding"] == "chunked"
        for n, chunk in enumerate(response.iter_raw()):
            if n == 0:
                assert chunk[4:8] == b"ftyp", "looks like an .m4a"
            total += len(chunk)
    assert total == fsim.faults.oversize_bytes >= 30_000_000
    assert call["size"] < 100_000, "the record does not warn of it"


def test_oversize_download_abandoned_midway_leaves_the_server_serving(fsim, clock, api):
    call = publish_with_audio(fsim, clock, AudioFault.OVERSIZE_UNDECLARED)
    with httpx.stream("GET", call["url"]) as response:
        next(response.iter_raw())
    assert api.json("/common/v1/countries")["countries"]


def test_silence_is_silent(fsim, clock, tmp_path):
    call = publish_with_audio(fsim, clock, AudioFault.SILENCE)
    _clips, silence = load_clips()
    assert (call["duration"], call["size"]) == (silence.duration, silence.size)
    path = tmp_path / "quiet.m4a"
    path.write_bytes(httpx.get(call["url"]).content)
    samples = decode_mono(path).astype(np.float64)
    assert len(samples) == pytest.approx(silence.duration * 16000, rel=0.05)
    assert np.abs(samples).max() < 330, "peaks below -40 dBFS (speech clips reach 10,000+)"
    assert np.sqrt(np.mean(samples**2)) < 33, "RMS below -60 dBFS"


def test_redirects_internal_and_ok(fsim, clock):
    internal = httpx.get(publish_with_audio(fsim, clock, AudioFault.REDIRECT_INTERNAL)["url"])
    assert internal.status_code == 302
    assert internal.headers["location"].startswith("http://169.254.169.254/")
    call = publish_with_audio(fsim, clock, AudioFault.REDIRECT_OK)
    moved = httpx.get(call["url"])
    assert moved.status_code == 302
    target = moved.headers["location"]
    assert target.startswith(fsim.url + "/") and target != call["url"]
    final = httpx.get(call["url"], follow_redirects=True)
    assert final.status_code == 200 and len(final.content) == call["size"]


# --- geo -----------------------------------------------------------------------------------


def test_geo_endpoints_and_the_wrapper_switch(fsim, api):
    countries = api.json("/common/v1/countries")["countries"]
    assert {c["iso_alpha2"] for c in countries} == {"US", "CA"}
    assert set(countries[0]) == {"coid", "country_name", "country_code", "iso_alpha2"}
    us = next(c for c in countries if c["iso_alpha2"] == "US")
    states = api.json(f"/common/v1/states/{us['coid']}")["states"]
    assert len(states) >= 3 and {s["coid"] for s in states} == {us["coid"]}
    assert set(states[0]) >= {"stid", "coid", "state_name", "state_code"}
    illinois = next(s for s in states if s["state_code"] == "IL")
    counties = api.json(f"/common/v1/counties/{illinois['stid']}")["counties"]
    assert "Cook" in {c["county_name"] for c in counties}
    assert set(counties[0]) >= {"ctid", "stid", "county_name"}
    cook = next(c for c in counties if c["county_name"] == "Cook")
    detail = api.json(f"/common/v1/county/{cook['ctid']}")
    assert detail["fips"] == "17031" and detail["state_code"] == "IL"
    assert set(detail) >= {"county_header", "type", "lat", "lon", "range", "timezone"}
    assert {"state_name", "country_name", "country_code"} <= set(detail)

    fsim.faults.geo_wrapper = "data"
    assert api.json("/common/v1/countries") == {"data": countries}
    assert api.json(f"/common/v1/states/{us['coid']}") == {"data": states}
    assert api.json(f"/common/v1/counties/{illinois['stid']}") == {"data": counties}
    assert error_code(api.get("/common/v1/states/999")) == 404
    assert error_code(api.get("/common/v1/county/1")) == 404


# --- the control surface -------------------------------------------------------------------


def test_control_endpoints_drive_a_simulator_from_outside(fsim, clock, api):
    control = httpx.Client(base_url=fsim.url)
    made = control.post("/_sim/playlists", json={"name": "Outside", "groups": ["2431-1001"]})
    uuid = made.json()["uuid"]
    record = control.post(
        "/_sim/publish",
        json={"playlist_uuid": uuid, "audio": "missing", "omit": ["size"], "fields": {"src": 7}},
    ).json()
    assert "size" not in record and record["src"] == 7
    assert httpx.get(record["url"]).status_code == 404
    listed = control.get("/_sim/calls", params={"playlist_uuid": uuid}).json()["calls"]
    assert urls(listed) == [record["url"]]

    assert control.post("/_sim/faults", json={"fail_next_500": 1}).json()["fail_next_500"] == 1
    assert api.get("/common/v1/countries").status_code == 500
    refused = control.post("/_sim/faults", json={"no_such_switch": 1})
    assert refused.status_code == 400 and "no_such_switch" in refused.text
    assert control.post("/_sim/faults", json={"max_pos_age": "soon"}).status_code == 400
    assert control.post("/_sim/faults", json={"max_pos_age": 60}).json()["max_pos_age"] == 60
    assert fsim.faults.max_pos_age == 60

    clock.advance(2)
    api.live(uuid, init=1)
    stats = control.get("/_sim/stats", params={"calls": "1"}).json()
    assert stats["billed_records"] == 1 == fsim.billed_records
    assert stats["served"] == {record["url"]: 1}
    assert stats["requests"]["live"] == 1
    control.post("/_sim/reset")
    assert control.get("/_sim/stats").json()["billed_records"] == 0
    control.close()


# --- bcfy sim ------------------------------------------------------------------------------


# --- life cycle ----------------------------------------------------------------------------


def open_sockets() -> set[str]:
    """This process's open sockets (their /proc/self/fd targets)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def test_stop_leaves_no_thread_socket_or_connection(clock):
    """A started simulator, with a kept-alive connection, a request held by latency and an
    oversize answer half read, stops: its threads end, its sockets close, its port refuses,
    and the connection it kept alive is closed from its side."""
    threads, sockets = set(threading.enumerate()), open_sockets()
    sim = FeedSimulator(clock=clock).start()
    kept = socket.create_connection(("127.0.0.1", int(sim.audio_host.rsplit(":", 1)[1])))
    kept.sendall(b"GET /_sim/stats HTTP/1.1\r\nHost: sim\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200 ")
    oversize = httpx.stream("GET", publish_with_audio(sim, clock, AudioFault.OVERSIZE)["url"])
    next(oversize.__enter__().iter_raw())
    sim.faults.latency = 3
    cut: list[Exception] = []

    def held_request() -> None:
        try:
            httpx.get(f"{sim.url}/common/v1/countries", timeout=30)
        except httpx.HTTPError as exc:
            cut.append(exc)

    held = threading.Thread(target=held_request)
    held.start()
    wait_until(lambda: sim.requests["countries"] == 1, 30, "the held request to arrive")

    sim.stop()
    kept.settimeout(30)
    assert kept.recv(65536) == b"", "the kept-alive connection is closed by the simulator"
    kept.close()
    oversize.__exit__(None, None, None)
    held.join(60)
    assert cut, "the held request was cut by the stop, not answered after it"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.url}/_sim/stats")
    wait_until(lambda: set(threading.enumerate()) <= threads, 30, "the simulator's threads")
    assert open_sockets() <= sockets

    never_started = FeedSimulator(clock=clock)
    never_started.stop()
    assert open_sockets() <= sockets


def start_bcfy_sim(port: int, extra_env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "sim", "--port", str(port), "--playlists", "2",
         "--calls-per-minute", "600"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    printed: dict[str, str] = {}
    while "BCFY_SIM_PLAYLISTS" not in printed:
        line = proc.stdout.readline()
        assert line, f"bcfy sim exited early: {proc.stderr.read()}"
        if match := re.match(r"export (\w+)=(.*)$", line.strip()):
            printed[match.group(1)] = match.group(2).strip("'")
    return proc, printed


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_bcfy_sim_prints_its_environment_serves_and_stops(stop_with):
    port = free_port()
    proc, env = start_bcfy_sim(port)
    try:
        assert env["BCFY_API_BASE"] == f"http://127.0.0.1:{port}"
        assert env["AUDIO_ALLOWED_HOSTS"] == f"127.0.0.1:{port}"
        uuids = env["BCFY_SIM_PLAYLISTS"].split()
        assert len(uuids) == 2
        bearer = jwt.encode(
            {"iss": env["BCFY_APP_ID"], "iat": int(time.time()), "exp": int(time.time()) + 600},
            env["BCFY_API_KEY"],
            headers={"kid": env["BCFY_API_KEY_ID"]},
        )

        def published() -> int:
            stats = httpx.get(f"{env['BCFY_API_BASE']}/_sim/stats").json()
            count: int = stats["playlists"][uuids[0]]
            return count

        wait_until(published, timeout=30, what="the generator's first call")
        time.sleep(1.1)  # until its second is complete
        answer = httpx.get(
            f"{env['BCFY_API_BASE']}/calls/v1/live/",
            params={"playlist_uuid": uuids[0], "init": 1},
            headers={"Authorization": f"Bearer {bearer}"},
        ).json()
        calls = answer["calls"]
        assert calls, answer
        assert httpx.get(calls[0]["url"]).status_code == 200
    finally:
        proc.send_signal(stop_with)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert re.search(r"GET /calls/v1/live/\?playlist_uuid=\S+ -> 200", err), err


def test_bcfy_sim_accepts_but_never_prints_a_key_from_the_environment():
    secret = "a-real-looking-secret-0123456789abcdef"
    proc, env = start_bcfy_sim(
        free_port(),
        {"BCFY_API_KEY_ID": "real-kid", "BCFY_API_KEY": secret, "BCFY_APP_ID": "real-app"},
    )
    try:
        now = int(time.time())
        bearer = jwt.encode(
            {"iss": "real-app", "iat": now, "exp": now + 600}, secret, headers={"kid": "real-kid"}
        )
        answer = httpx.get(
            f"{env['BCFY_API_BASE']}/calls/v1/playlists_public",
            headers={"Authorization": f"Bearer {bearer}"},
        ).json()
        assert len(answer["playlists"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert secret not in out + err
    assert env["BCFY_API_KEY"] != secret
