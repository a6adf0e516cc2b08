"""Validation of call records, and storing a page on real PostgreSQL: one statement per page,
duplicates skipped and counted, the cursor forward only, bad records quarantined with their
reason while the rest is stored."""

from __future__ import annotations

import asyncio
import uuid as uuid_mod
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tasks.ingest.storage import PollRecord, store_page
from tasks.ingest.validation import Page, Rejected, split_page, validate_call
from tests.conftest import Services
from tests.support.ingest import DROP, NOW, TABLES
from tests.support.ingest import call_record as record


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"groupId": DROP}, "missing groupId"),
        ({"groupId": 2431}, "groupId is not a non-empty string"),
        ({"groupId": " "}, "groupId is not a non-empty string"),
        ({"groupId": "x" * 101}, "groupId is oversize"),
        ({"ts": DROP}, "missing ts"),
        ({"ts": "soon"}, "ts is not a whole number"),
        ({"ts": 1.5e9 + 0.5}, "ts is not a whole number"),
        ({"ts": True}, "ts is not a whole number"),
        ({"ts": -5}, "ts is out of range"),
        ({"ts": NOW + 3 * 86400}, "ts is out of range"),
        ({"url": DROP}, "missing url"),
        ({"url": 7}, "url is not a string"),
        ({"url": "ftp://x/a.m4a"}, "url is not an http(s) URL"),
        ({"url": "http:///a.m4a"}, "url is not an http(s) URL"),
        ({"url": "/audio/a.m4a"}, "url is not an http(s) URL"),
        ({"url": "https://x/" + "a" * 3000}, "url is oversize"),
        ({"url": "https://x/a b.m4a"}, "url contains white space"),
        ({"duration": -1}, "duration is negative"),
        ({"duration": 90000}, "duration is absurd"),
        ({"duration": "long"}, "duration is not a number"),
        ({"duration": float("nan")}, "duration is not a finite number"),
        ({"end_ts": NOW - 10}, "end_ts (1749999990) is before the start"),
        ({"end_ts": NOW + 7200, "duration": DROP}, "call is absurdly long"),
        ({"sid": "north"}, "sid is not a whole number"),
        ({"sid": 2**40}, "sid is out of range"),
        ({"size": -3}, "size is out of range"),
        ({"freq": "high"}, "freq is not a number"),
        ({"descr": ["a"]}, "descr is not a string"),
        ({"display": "d" * 1001}, "display is oversize"),
    ],
)
def test_a_bad_record_is_rejected_with_its_reason(changes, reason):
    with pytest.raises(Rejected, match=None) as err:
        validate_call(record(**changes), latest_ts=NOW + 86400)
    assert reason in str(err.value)


def test_not_an_object_is_rejected():
    with pytest.raises(Rejected, match="not an object but list"):
        validate_call([1, 2], latest_ts=NOW)


def test_tolerated_forms_and_derived_times():
    row = validate_call(
        record(ts=float(NOW), sid="2431", start_ts=DROP, end_ts=DROP, duration=2.5, tag=None),
        latest_ts=NOW + 86400,
    )
    assert (row["ts"], row["sid"], row["tag"]) == (NOW, 2431, None)
    assert (row["st"], row["en"], row["d"]) == (NOW, NOW + 2.5, 2.5)
    row = validate_call(record(duration=DROP), latest_ts=NOW + 86400)
    assert row["d"] == 4.0  # from start_ts and end_ts
    bare = {"groupId": "c-1", "ts": NOW, "url": "http://x/y.mp3"}
    row = validate_call(bare, latest_ts=NOW)
    assert (row["st"], row["en"], row["d"], row["raw"]) == (NOW, None, None, bare)


# --- storing ------------------------------------------------------------------------------


@pytest.fixture
def playlist(services: Services) -> Iterator[str]:
    with services.db() as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
        uuid = str(uuid_mod.uuid4())
        conn.execute("INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'p')", (uuid,))
    yield uuid


class CountingConnection(psycopg.AsyncConnection):
    """Counts the statements sent through it."""

    statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.statements += 1
        return await super().execute(*args, **kwargs)


def store(services: Services, uuid: str, page: Page, cursor: int | None) -> Any:
    async def go() -> Any:
        async with await CountingConnection.connect(services.database_url) as conn:
            poll = PollRecord(uuid, datetime.now(UTC), "pos", http_status=200, last_pos=cursor)
            stored = await store_page(conn, poll, page, new_cursor=cursor)
            await conn.commit()
            return stored

    CountingConnection.statements = 0
    return asyncio.run(go())


def q(services: Services, query: str, *args: Any) -> list[tuple]:
    with services.db() as conn:
        return conn.execute(query, args).fetchall()


def test_a_page_is_one_insert_with_duplicates_counted(services, playlist):
    page = split_page([record(i) for i in range(50)] + [record(3), record(7)], NOW + 86400)
    stored = store(services, playlist, page, NOW + 60)
    assert (stored.received, stored.new, stored.duplicate, stored.quarantined) == (52, 50, 2, 0)
    # The calls, the cursor, the poll log: three statements, however long the page.
    assert CountingConnection.statements == 3
    big = split_page([record(i) for i in range(100, 1100)], NOW + 86400)
    assert store(services, playlist, big, NOW + 65).new == 1000
    assert CountingConnection.statements == 3
    again = store(
        services, playlist, split_page([record(i) for i in range(45, 55)], NOW + 86400), NOW + 70
    )
    assert (again.new, again.duplicate) == (5, 5)
    assert q(services, "SELECT count(*) FROM bcfy_calls_raw")[0][0] == 1055
    assert q(services, "SELECT count(*) FROM call_audio")[0][0] == 1055  # 003's trigger
    # Each call carries its page's poll log row.
    assert q(services, "SELECT count(DISTINCT poll_id) FROM bcfy_calls_raw")[0][0] == 3
    log = q(
        services,
        "SELECT calls_received, calls_new, calls_duplicate FROM bcfy_playlist_poll_log ORDER BY id",
    )
    assert log == [(52, 50, 2), (1000, 1000, 0), (10, 5, 5)]


def test_the_cursor_never_moves_back(services, playlist):
    store(services, playlist, Page(), NOW + 100)
    store(services, playlist, Page(), NOW + 50)
    assert q(services, "SELECT cursor_pos FROM bcfy_playlists")[0][0] == NOW + 100
    store(services, playlist, Page(), None)
    assert q(services, "SELECT cursor_pos FROM bcfy_playlists")[0][0] == NOW + 100


def test_values_json_in_postgresql_cannot_hold_are_quarantined(services, playlist):
    bad = [
        record(1, descr="nul \x00 inside"),
        record(2, extra={"deep": ["\ud800"]}),
        record(3, extra=float("inf")),
    ]
    page = split_page([record(0), *bad, record(4)], NOW + 86400)
    stored = store(services, playlist, page, NOW + 10)
    assert (stored.new, stored.quarantined) == (2, 3)
    reasons = sorted(r for (r,) in q(services, "SELECT reason FROM bcfy_calls_quarantine"))
    assert reasons == [
        "a number is NaN or infinite",
        "a string holds a NUL character",
        "a string holds an invalid character (lone surrogate)",
    ]
    raws = [r for (r,) in q(services, "SELECT raw FROM bcfy_calls_quarantine")]
    assert any(r.get("descr") == "nul \ufffd inside" for r in raws)


def test_a_row_the_database_refuses_is_quarantined_and_the_rest_stored(services, playlist):
    page = split_page([record(i) for i in range(5)], NOW + 86400)
    page.rows[2]["sid"] = 2**40  # past validation somehow: integer out of range in SQL
    stored = store(services, playlist, page, NOW + 10)
    assert (stored.new, stored.quarantined) == (4, 1)
    ((reason, raw),) = q(services, "SELECT reason, raw FROM bcfy_calls_quarantine")
    assert reason.startswith("refused by the database") and raw["ts"] == NOW + 2
    assert q(services, "SELECT cursor_pos FROM bcfy_playlists")[0][0] == NOW + 10
