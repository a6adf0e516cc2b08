"""Hostile answers from the service: odd numbers, huge values, control characters, NUL, deep
nesting, oversize bodies and records. One odd record never fails its page; an envelope that
cannot be read fails that poll only, with a clear error; nothing is lost.

The property-based tests send generated JSON over real HTTP (a canned-answer server on
127.0.0.1) through the real client, then validate and store against the real PostgreSQL.
Example counts are bounded (see EXAMPLES) so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import threading
import uuid as uuid_mod
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.geo.tables import COUNTIES, COUNTRIES, STATES, upsert
from tasks.ingest.storage import PollRecord, store_page
from tasks.ingest.validation import Rejected, split_page, validate_call
from tests.conftest import Services
from tests.support.ingest import NOW, direct_context
from tests.support.ingest import call_record as good_record
from workers.clients.broadcastify import BroadcastifyClient, BroadcastifyError, LivePage
from workers.core.runtime import Runtime, db_connection
from workers.core.settings import reset_settings_cache

LATEST = NOW + 86_400
T = TypeVar("T")
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- odd numbers: examples -------------------------------------------------------------------

# Strings str.isdigit() accepts that int() refuses, or that int() refuses for their length.
ODD_DIGITS = ["¹²", "²", "9" * 5000, "-" + "1" * 4400, "①"]


@pytest.mark.parametrize("value", ODD_DIGITS)
@pytest.mark.parametrize("field", ["ts", "sid", "size", "nodeId", "src"])
def test_an_odd_digit_string_is_rejected_with_its_reason(field, value):
    with pytest.raises(Rejected) as err:
        validate_call(good_record(**{field: value}), latest_ts=LATEST)
    assert f"{field} is not a whole number" in str(err.value)
    assert len(str(err.value)) < 200, "the reason stays short"


@pytest.mark.parametrize("field", ["duration", "freq", "start_ts", "end_ts"])
def test_a_number_past_the_float_range_is_rejected_not_raised(field):
    with pytest.raises(Rejected) as err:
        validate_call(good_record(**{field: 10**400}), latest_ts=LATEST)
    assert field in str(err.value)


def test_a_page_with_odd_numbers_keeps_its_good_records():
    records = [good_record(0), good_record(1, size="¹²"), good_record(2, ts="9" * 5000)]
    page = split_page(records, LATEST)
    assert [row["ts"] for row in page.rows] == [NOW]
    assert [reason for reason, _ in page.rejected] == [
        "size is not a whole number: '¹²'",
        "ts is not a whole number: '99999999999999999999999999999999999999999999999999999'... "
        "(5000 characters)",
    ]


# --- a canned-answer server over real HTTP ---------------------------------------------------


class CannedServer:
    """Answers every request with `body` (HTTP 200; chunked when `declare_length` is off)."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.declare_length = True
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in separate writes

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = canned.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                try:
                    if canned.declare_length:
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for at in range(0, len(body), 65536):
                        chunk = body[at : at + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True  # the client stopped reading

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Canned:
    server: CannedServer
    services: Services
    monkeypatch: pytest.MonkeyPatch
    conn: psycopg.Connection | None = None

    def configure(self, **values: Any) -> None:
        for name, value in values.items():
            self.monkeypatch.setenv(name, str(value))
        Runtime.shutdown_current()
        reset_settings_cache()

    def answer(self, body: bytes | str) -> None:
        self.server.body = body.encode() if isinstance(body, str) else body

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return Runtime.current().run(coro)

    @property
    def api(self) -> BroadcastifyClient:
        return Runtime.current().bcfy_api

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.conn is None:
            self.conn = self.services.db()
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def canned(services: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Canned]:
    """A canned-answer server and the client pointed at it (each test stores under playlists
    of its own, so the tables are not emptied)."""
    server = CannedServer()
    c = Canned(server, services, monkeypatch)
    c.configure(
        BCFY_API_BASE=server.url,
        BCFY_API_KEY_ID="key",
        BCFY_API_KEY="not-a-real-secret-only-for-these-tests",
        BCFY_APP_ID="app",
        BCFY_USERNAME="",
        BCFY_RETRY_ATTEMPTS=1,
    )
    try:
        yield c
    finally:
        if c.conn is not None:
            c.conn.close()
        Runtime.shutdown_current()
        reset_settings_cache()
        server.stop()


def envelope(calls: str) -> str:
    """A live answer around the JSON text of its calls."""
    return f'{{"serverTime":{NOW},"lastPos":{NOW},"calls":' + calls + "}"


def live(c: Canned) -> LivePage | BroadcastifyError:
    """The live answer as the client reads it, or the error it raises for it."""
    try:
        return c.run(c.api.live_calls(str(uuid_mod.uuid4()), pos=NOW - 60))
    except BroadcastifyError as exc:
        return exc


@pytest.mark.parametrize("value", ['"¹²"', '"²"', '"' + "9" * 5000 + '"', "9" * 5000, "1e400"])
@pytest.mark.parametrize("field", ["lastPos", "serverTime"])
def test_an_unreadable_envelope_number_is_a_clear_error(canned, field, value):
    envelope = {"serverTime": NOW, "lastPos": NOW, "calls": []}
    text = json.dumps(envelope).replace(f'"{field}": {NOW}', f'"{field}": {value}')
    canned.answer(text)
    outcome = live(canned)
    assert isinstance(outcome, BroadcastifyError), outcome
    assert f"{field} is not a whole number" in str(outcome)
    assert len(str(outcome)) < 300


def test_a_huge_number_literal_fails_only_its_record(canned):
    good = json.dumps(good_record(0))
    bad = json.dumps(good_record(1)).replace('"size": 23456', '"size": ' + "7" * 5000)
    canned.answer(envelope(f"[{good},{bad}]"))
    page = live(canned)
    assert isinstance(page, LivePage), page
    split = split_page(page.calls, LATEST)
    assert len(split.rows) == 1
    ((reason, _),) = split.rejected
    assert reason.startswith("size is not a whole number")


def test_a_body_nested_past_the_parser_is_a_clear_error(canned):
    canned.answer(envelope("[" * 100_000))
    outcome = live(canned)
    assert isinstance(outcome, BroadcastifyError), outcome


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_answer_is_not_read_past_the_response_cap(canned, declared):
    canned.configure(BCFY_MAX_RESPONSE_BYTES=200_000)
    canned.server.declare_length = declared
    calls = [json.dumps(good_record(i, notes="n" * 1000)) for i in range(300)]  # about 1.4 MB
    canned.answer(envelope("[" + ",".join(calls) + "]"))
    outcome = live(canned)
    assert isinstance(outcome, BroadcastifyError), outcome
    assert "larger than BCFY_MAX_RESPONSE_BYTES (200000" in str(outcome)
    assert ("declared" if declared else "over 200000 bytes read") in str(outcome)
    canned.answer(envelope("[" + ",".join(calls[:100]) + "]"))  # about 0.47 MB
    canned.configure(BCFY_MAX_RESPONSE_BYTES=1 << 20)
    page = live(canned)
    assert isinstance(page, LivePage) and len(page.calls) == 100


# --- generated JSON ----------------------------------------------------------------------------


class Literal:
    """A JSON number literal written as it is (Python cannot hold some of them as an int)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Literal({self.text[:20]!r}, {len(self.text)} chars)"


SPECIAL_STRINGS = [
    *ODD_DIGITS,
    "١٢",  # Arabic-Indic digits: int() takes them, the service never sends them
    " 12 ",
    "1_000",
    "-0",
    "NaN",
    "Infinity",
    "1e309",
    "",
    "\x00",
    "nul\x00inside",
    "\x1b[2J\x1b[31mred\x07",
    "\u202eevil",
    "\ud800",
    "x" * 70_000,
]
SPECIAL_LITERALS = [
    Literal("9" * 5000),
    Literal("-" + "1" * 4400),
    Literal("1" * 400),
    Literal("1e400"),
    Literal("-1e400"),
    Literal("NaN"),
    Literal("Infinity"),
    Literal("1.0E2"),
    Literal("-0.0"),
]
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from(SPECIAL_LITERALS),
)
json_values = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=10,
)


def dump(value: Any) -> str:
    """JSON text of a generated value (non-finite floats as NaN/Infinity, as Python writes)."""
    if isinstance(value, Literal):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


URL_PREFIX = "https://calls.example.org/"
# A plausible value for each field of a call record.
GOOD_FIELDS: dict[str, Any] = {
    "groupId": st.sampled_from(["2431-1001", "2431-1002", "c-7"]),
    "ts": st.integers(NOW - 3600, NOW) | st.integers(NOW - 3600, NOW).map(str),
    "start_ts": st.integers(NOW - 3600, NOW - 3600).map(float),
    "end_ts": st.just(NOW),
    "duration": st.floats(0, 60),
    "url": st.just("URL"),  # made unique per record below
    "sid": st.integers(0, 99_999),
    "siteId": st.integers(0, 999),
    "nodeId": st.integers(0, 2**40),
    "feedId": st.integers(0, 99_999),
    "tgId": st.integers(0, 99_999),
    "tag": st.integers(0, 99),
    "freq": st.floats(0, 999),
    "src": st.integers(0, 2**40) | st.integers(0, 2**40).map(str),
    "descr": any_text,
    "display": any_text,
    "grouping": any_text,
    "size": st.integers(0, 10**7),
}


@st.composite
def call_records(draw: Any, i: int) -> Any:
    """A call record: mostly plausible, each field sometimes missing or anything at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even an object
    record: dict[str, Any] = {}
    for name, good in GOOD_FIELDS.items():
        kind = draw(st.integers(0, 29))
        if kind == 0:
            continue
        if kind == 1:
            record[name] = draw(json_values)
        elif name == "url":
            record[name] = f"{URL_PREFIX}{i}/{draw(st.uuids())}.m4a"
        else:
            record[name] = draw(good)
    extra = draw(st.dictionaries(any_text, json_values, max_size=2))
    for key, value in extra.items():
        record.setdefault(key, value)
    return record


@st.composite
def pages(draw: Any) -> list[Any]:
    n = draw(st.integers(0, 8))
    return [draw(call_records(i)) for i in range(n)]


def live_body(records: list[Any]) -> str:
    return envelope("[" + ",".join(dump(r) for r in records) + "]")


# --- property: records and pages ---------------------------------------------------------------


@EXAMPLES
@given(value=json_values, field=st.sampled_from([*GOOD_FIELDS, "anything"]))
def test_any_value_in_any_field_is_stored_or_rejected_never_raised(value, field):
    text = dump(good_record(0, **{field: "__SLOT__"})).replace('"__SLOT__"', dump(value))
    record = json.loads(text, parse_int=_int_or_text)
    try:
        row = validate_call(record, latest_ts=LATEST)
    except Rejected as exc:
        assert str(exc)
    else:
        assert row["raw"] is record


def _int_or_text(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


@EXAMPLES
@given(records=pages())
def test_a_generated_page_is_stored_once_or_quarantined_never_lost(canned, records):
    # Record urls are unique within a page; a prefix of its own makes them unique across
    # examples too, so no valid record is a duplicate of an earlier example's.
    canned.answer(live_body(records).replace(URL_PREFIX, f"{URL_PREFIX}{uuid_mod.uuid4()}/"))
    page = live(canned)
    assert isinstance(page, LivePage), page
    split = split_page(page.calls, LATEST)
    assert split.received == len(records)
    playlist = str(uuid_mod.uuid4())
    canned.sql("INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'p')", playlist)

    async def store() -> Any:
        async with db_connection() as conn:
            poll = PollRecord(playlist, datetime.now(UTC), "pos", http_status=200)
            return await store_page(conn, poll, split, new_cursor=NOW)

    stored = canned.run(store())
    assert stored.new + stored.duplicate + stored.quarantined == len(records)
    calls = canned.sql("SELECT url FROM bcfy_calls_raw WHERE poll_id = %s", stored.poll_id)
    quarantined = canned.sql(
        "SELECT reason FROM bcfy_calls_quarantine WHERE poll_id = %s", stored.poll_id
    )
    assert (len(calls), len(quarantined)) == (stored.new, stored.quarantined)
    # Every valid record exactly once: stored, or quarantined if the database refused it
    # (urls are unique per record, so none is a duplicate).
    stored_urls = [u for (u,) in calls]
    assert stored.duplicate == 0
    assert len(set(stored_urls)) == len(stored_urls)
    assert set(stored_urls) <= {row["url"] for row in split.rows}
    refused = stored.quarantined - len(split.rejected)
    assert stored.new + refused == len(split.rows)
    for reason, _ in split.rejected:
        assert (reason,) in quarantined
    ((cursor,),) = canned.sql("SELECT cursor_pos FROM bcfy_playlists WHERE uuid = %s", playlist)
    assert cursor == NOW


# --- property: the envelope ------------------------------------------------------------------


@st.composite
def envelopes(draw: Any) -> str:
    parts = {}
    for name in ("serverTime", "lastPos", "calls", "errors"):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            continue
        if kind == 1 and name in ("serverTime", "lastPos"):
            parts[name] = dump(draw(st.integers(0, 2**40)))
        elif kind == 1 and name == "calls":
            parts[name] = "[" + ",".join(dump(r) for r in draw(pages())) + "]"
        else:
            parts[name] = dump(draw(json_values))
    body = "{" + ",".join(f'"{k}":{v}' for k, v in parts.items()) + "}"
    if draw(st.integers(0, 9)) == 0:
        return dump(draw(json_values))  # not an object at all
    if draw(st.integers(0, 9)) == 0:
        return body[: draw(st.integers(0, len(body)))]  # cut short
    return body


@EXAMPLES
@given(body=envelopes())
def test_any_live_answer_is_a_page_or_a_clear_error(canned, body):
    canned.answer(body)
    outcome = live(canned)
    if isinstance(outcome, LivePage):
        assert isinstance(outcome.calls, list)
        assert outcome.last_pos is None or isinstance(outcome.last_pos, int)
        split_page(outcome.calls, LATEST)
    else:
        assert str(outcome) and len(str(outcome)) < 1000


@EXAMPLES
@given(body=st.binary(max_size=200))
def test_any_bytes_are_a_page_or_a_clear_error(canned, body):
    canned.answer(body)
    outcome = live(canned)
    assert isinstance(outcome, LivePage | BroadcastifyError)


# --- property: geo answers -------------------------------------------------------------------


@st.composite
def geo_records(draw: Any, keys: tuple[str, ...]) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)
    record: dict[str, Any] = {}
    for key in keys:
        kind = draw(st.integers(0, 5))
        if kind == 0:
            continue
        record[key] = draw(json_values) if kind == 1 else draw(st.integers(0, 2**31 - 1))
    return record


GEO = {
    "countries": (COUNTRIES, ("coid", "country_name", "country_code", "iso_alpha2")),
    "states": (STATES, ("stid", "coid", "state_name", "state_code")),
    "counties": (COUNTIES, ("ctid", "stid", "county_name")),
}


@EXAMPLES
@given(
    kind=st.sampled_from(sorted(GEO)),
    data=st.data(),
)
def test_any_geo_answer_is_stored_or_skipped_never_raised(canned, kind, data):
    table, keys = GEO[kind]
    records = data.draw(st.lists(geo_records(keys), max_size=6))
    wrapper = data.draw(st.sampled_from([kind, "data"]))
    canned.answer(f'{{"{wrapper}":[' + ",".join(dump(r) for r in records) + "]}")
    fetch = {
        "countries": canned.api.countries,
        "states": lambda: canned.api.states(1),
        "counties": lambda: canned.api.counties(1),
    }[kind]
    ctx = direct_context("tests.geo_upsert")

    async def go() -> int:
        return await upsert(ctx, table, await fetch())

    stored = canned.run(go())
    assert 0 <= stored <= len(records)


# --- property: the playlist answer (bcfy playlists add) ----------------------------------------


@EXAMPLES
@given(
    info=st.fixed_dictionaries(
        {},
        optional={
            "name": json_values,
            "descr": json_values,
            "groups": json_values
            | st.lists(st.fixed_dictionaries({"groupId": json_values}), max_size=3),
            "ctids": json_values | st.lists(json_values, max_size=4),
            "public": json_values,
            "other": json_values,
        },
    ),
    wrapped=st.booleans(),
)
def test_any_playlist_answer_is_followed_or_a_clear_error(canned, info, wrapped):
    from workers.cli.playlists import _add

    canned.answer(dump({"playlist": info} if wrapped else info))
    playlist = str(uuid_mod.uuid4())
    try:
        name, _, ctids, created = canned.run(_add(playlist))
    except BroadcastifyError as exc:
        assert str(exc)
        return
    assert created
    ((stored_name, groups),) = canned.sql(
        "SELECT name, groups FROM bcfy_playlists WHERE uuid = %s", playlist
    )
    assert stored_name == name
    assert isinstance(groups, list)
    assert all(0 <= c <= 2**31 - 1 for c in ctids)


# --- end to end over the feed simulator ------------------------------------------------------


def test_a_superscript_size_among_good_records_is_quarantined_and_the_cursor_moves(
    ingest_manual,
):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    first = ing.sim.publish_call(uuid)
    ing.advance(2)
    ing.follow(uuid)
    ing.poll_every_10s(1)
    cursor = ing.cursor(uuid)
    assert cursor is not None
    good = [first, *(ing.sim.publish_call(uuid) for _ in range(3))]
    bad = ing.sim.publish_call(uuid, size="¹²")
    good.append(ing.sim.publish_call(uuid))
    ing.advance(3)
    ing.poll_every_10s(1)

    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in good)
    ((reason, raw),) = ing.sql("SELECT reason, raw FROM bcfy_calls_quarantine")
    assert reason == "size is not a whole number: '¹²'" and raw == bad
    poll = ing.polls(uuid)[-1]
    assert poll["success"] and poll["calls_quarantined"] == 1
    assert ing.cursor(uuid) > cursor
    ing.poll_every_10s(2)
    assert ing.sim.billed_records == len(good) + 1, "the page is not read again"


def test_an_answer_over_the_response_cap_fails_that_poll_and_keeps_the_cursor(ingest_manual):
    ing = ingest_manual
    ing.configure(BCFY_MAX_RESPONSE_BYTES=4096, BCFY_RETRY_ATTEMPTS=1)
    small = ing.sim.add_playlist(calls_per_minute=0)
    big = ing.sim.add_playlist(calls_per_minute=0)
    for uuid in (small, big):
        ing.follow(uuid)
    ing.poll_every_10s(1)
    cursor = ing.cursor(big)
    ing.sim.publish_call(small)
    for _ in range(12):
        ing.sim.publish_call(big, notes="n" * 400)  # about 7 KB of answer
    ing.advance(3)
    assert ing.poll() == "error"

    failed = ing.polls(big)[-1]
    assert not failed["success"]
    assert "BCFY_MAX_RESPONSE_BYTES" in failed["error"] and "4096" in failed["error"]
    assert ing.cursor(big) == cursor
    assert len(ing.stored_urls(small)) == 1, "the other playlist went on"
    _, error = ing.runs("tasks.ingest.poll_followed_playlists")[-1]
    assert "BCFY_MAX_RESPONSE_BYTES" in error

    ing.configure(BCFY_MAX_RESPONSE_BYTES=1 << 20)
    ing.advance(10)
    assert ing.poll() == "ok"
    assert len(ing.stored_urls(big)) == 12


def test_a_record_over_the_raw_cap_is_quarantined_with_a_bounded_copy(ingest_manual):
    ing = ingest_manual
    ing.configure(BCFY_MAX_RECORD_BYTES=2048)
    uuid = ing.follow_a_quiet_playlist()
    good = [ing.sim.publish_call(uuid, notes="n" * 500) for _ in range(2)]
    ing.sim.publish_call(uuid, notes="x" * 100_000)
    ing.advance(3)
    ing.poll_every_10s(1)

    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in good)
    ((reason, raw, size),) = ing.sql(
        "SELECT reason, raw, octet_length(raw::text) FROM bcfy_calls_quarantine"
    )
    assert "BCFY_MAX_RECORD_BYTES" in reason and "2048" in reason
    assert raw["truncated"] is True and raw["bytes"] > 100_000
    assert raw["json_head"].startswith("{")
    assert size < 2048 + 200, "the quarantined copy is bounded too"
    assert ing.polls(uuid)[-1]["calls_quarantined"] == 1
