"""The ingest job against the feed simulator over real HTTP, on real PostgreSQL and Redis: every
call served stored exactly once and read once, the cursor's rules, retries and errors, the poll
log, quarantine, the 5 s rule, bounded concurrency, the audio trigger."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid as uuid_mod

import pytest

from tests.support.ingest import SECRET, Ingest, direct_context
from workers.clients.broadcastify import BroadcastifyClient
from workers.core.runtime import Runtime
from workers.dev.simulator import OMIT

POLL = "tasks.ingest.poll_followed_playlists"


def test_every_call_served_is_stored_once_and_read_once(ingest_manual):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(name="County fire", calls_per_minute=40)
    ing.advance(300)  # five minutes of calls before we follow it
    ing.follow(uuid)
    ing.poll_every_10s(30)

    stored = ing.stored_urls(uuid)
    assert len(stored) > 150
    assert len(stored) == len(set(stored))
    served = ing.served_calls(uuid)
    assert sorted(stored) == sorted(c["url"] for c in served)
    # Read efficiency: each call record read (billed) once.
    assert all(ing.sim.served_count(c) == 1 for c in served)
    assert ing.sim.billed_records == len(stored)

    polls = ing.polls(uuid)
    assert [p["mode"] for p in polls] == ["init"] + ["pos"] * 29
    assert polls[0]["calls_received"] == 25  # init=1: the last 25
    # Every later poll sent the cursor the previous one stored: nothing skipped, none re-read.
    cursor = polls[0]["last_pos"]
    for p in polls[1:]:
        assert p["pos_sent"] == cursor
        cursor = p["last_pos"] or cursor
    assert ing.cursor(uuid) == cursor
    # Every call published after the first answer was served, so stored.
    after_first = [c for c in ing.sim.calls(uuid) if polls[0]["last_pos"] < c["ts"] <= cursor]
    assert {c["url"] for c in after_first} <= set(stored)
    assert sum(p["calls_new"] for p in polls) == len(stored)
    assert all(p["success"] and p["http_status"] == 200 for p in polls)


def test_the_stored_call_keeps_every_field(ingest_manual):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    record = ing.sim.publish_call(uuid, duration=7.5, extra_field={"kept": True})
    ing.advance(2)
    ing.follow(uuid)
    assert ing.poll() == "ok"
    ((raw, group, ts, started, ended, duration, url, sid, tg, freq, src, size),) = ing.sql(
        "SELECT raw, group_id, call_ts, extract(epoch FROM started_at),"
        " extract(epoch FROM ended_at), duration_sec, url, sid, tg_id, freq, src, size_bytes"
        " FROM bcfy_calls_raw"
    )
    assert raw == record and raw["extra_field"] == {"kept": True}
    assert (group, ts, url) == (record["groupId"], record["ts"], record["url"])
    assert started == record["start_ts"] and ended == record["end_ts"]
    assert duration == 7.5
    assert (sid, tg, freq, src, size) == (
        record["sid"],
        record["tgId"],
        record["freq"],
        record["src"],
        record["size"],
    )
    # The seed's debugging queries work as written.
    ing.sql("SELECT COUNT(*) FROM bcfy_calls_raw WHERE started_at > NOW() - INTERVAL '5 minutes'")
    (latest,) = ing.sql(
        "SELECT * FROM bcfy_playlist_poll_log ORDER BY poll_started_at DESC LIMIT 10"
    )
    assert str(latest[2]) == uuid  # playlist_uuid


def test_the_cursor_holds_when_lastpos_comes_back_0(ingest_manual):
    ing = ingest_manual
    assert ing.sim.faults.lastpos_zero_on_empty
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    for _ in range(3):
        ing.sim.publish_call(uuid)
        ing.advance(1)
    ing.follow(uuid)
    ing.poll_every_10s(1)
    cursor = ing.cursor(uuid)
    assert cursor and len(ing.stored_urls()) == 3
    ing.poll_every_10s(3)  # nothing new: lastPos 0 each time
    assert ing.cursor(uuid) == cursor
    empty = ing.polls(uuid)[1:]
    assert [p["last_pos"] for p in empty] == [0, 0, 0]
    assert all(p["pos_sent"] == cursor and p["success"] for p in empty)
    ing.sim.publish_call(uuid)
    ing.sim.publish_call(uuid)
    ing.advance(5)
    ing.poll_every_10s(1)
    assert len(ing.stored_urls()) == 5
    assert ing.sim.billed_records == 5
    assert ing.cursor(uuid) > cursor


def test_an_empty_playlist_is_asked_with_init_until_it_has_a_cursor(ingest_manual):
    ing = ingest_manual
    uuid = ing.follow_a_quiet_playlist(2)
    assert ing.cursor(uuid) is None
    assert [p["mode"] for p in ing.polls(uuid)] == ["init", "init"]
    ing.sim.publish_call(uuid)
    ing.advance(2)
    ing.poll_every_10s(2)
    assert [p["mode"] for p in ing.polls(uuid)] == ["init", "init", "init", "pos"]
    assert len(ing.stored_urls()) == 1 and ing.cursor(uuid) is not None


def test_two_calls_sharing_group_and_second_are_both_kept(ingest_manual):
    ing = ingest_manual
    uuid = ing.follow_a_quiet_playlist()
    ing.sim.faults.duplicate_group_ts = 2
    ing.sim.publish_call(uuid)
    ing.sim.publish_call(uuid)
    ing.advance(3)
    ing.poll_every_10s(1)
    rows = ing.sql("SELECT group_id, call_ts, url FROM bcfy_calls_raw")
    assert len(rows) == 4 and len({r[2] for r in rows}) == 4
    assert len({(r[0], r[1]) for r in rows}) <= 2  # twins share groupId and ts


def test_calls_served_again_are_recognised_and_stored_once(ingest_manual):
    ing = ingest_manual
    ing.sim.faults.reserve_overlap = True
    uuid = ing.sim.add_playlist(calls_per_minute=30)
    ing.advance(60)
    ing.follow(uuid)
    ing.poll_every_10s(12)
    stored = ing.stored_urls(uuid)
    assert sorted(stored) == sorted(c["url"] for c in ing.served_calls(uuid))
    polls = ing.polls(uuid)
    duplicates = sum(p["calls_duplicate"] for p in polls)
    assert duplicates > 0  # the service served them again (and billed them): we noticed
    assert sum(p["calls_new"] for p in polls) == len(stored)
    assert sum(p["calls_received"] for p in polls) == ing.sim.billed_records


def test_bad_records_are_quarantined_and_the_rest_of_the_page_stored(ingest_manual):
    ing = ingest_manual
    uuid = ing.follow_a_quiet_playlist()
    good = [ing.sim.publish_call(uuid) for _ in range(3)]
    bad = {
        "missing groupId": ing.sim.publish_call(uuid, groupId=OMIT),
        "missing url": ing.sim.publish_call(uuid, url=OMIT),
        "url is not an http(s) URL": ing.sim.publish_call(uuid, url="ftp://example.org/a.m4a"),
        "duration is negative": ing.sim.publish_call(uuid, duration=-4),
        "duration is absurd": ing.sim.publish_call(uuid, duration=86400 * 3),
        "start_ts is not a number": ing.sim.publish_call(uuid, start_ts="yesterday"),
        "sid is not a whole number": ing.sim.publish_call(uuid, sid="north"),
        "descr is oversize": ing.sim.publish_call(uuid, descr="x" * 5000),
    }
    good.append(ing.sim.publish_call(uuid, tag=None, size=OMIT))  # optional fields may be absent
    ing.advance(3)
    ing.poll_every_10s(1)

    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in good)
    rows = ing.sql(
        "SELECT reason, raw, playlist_uuid::text, polled_at, poll_id FROM bcfy_calls_quarantine"
    )
    assert len(rows) == len(bad)
    by_raw = {json.dumps(raw, sort_keys=True): reason for reason, raw, *_ in rows}
    for expected, record in bad.items():
        assert expected in by_raw[json.dumps(record, sort_keys=True)]
    poll = ing.polls(uuid)[-1]
    assert {r[2] for r in rows} == {uuid}
    assert {r[3] for r in rows} == {poll["poll_started_at"]}
    assert {r[4] for r in rows} == {poll["id"]}
    assert (poll["calls_received"], poll["calls_new"], poll["calls_quarantined"]) == (
        len(good) + len(bad),
        len(good),
        len(bad),
    )
    # The cursor moved past the page: the bad records are not asked for again.
    ing.poll_every_10s(1)
    assert ing.sim.billed_records == len(good) + len(bad)


def test_429_and_500_are_retried_and_nothing_is_lost(ingest):
    ing = ingest
    ing.configure(INGEST_MIN_POLL_GAP_SEC=1)  # each retry waits out the gap: keep it short
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.sim.publish_call(uuid)
    time.sleep(1.1)
    ing.follow(uuid)
    ing.sim.faults.fail_next_429, ing.sim.faults.retry_after = 1, 1
    ing.sim.faults.fail_next_500 = 2
    started = time.monotonic()
    assert ing.poll() == "ok"
    assert time.monotonic() - started >= 1.0, "Retry-After was honoured"
    assert len(ing.stored_urls()) == 1
    assert ing.sim.requests["live"] == 4
    (poll,) = ing.polls(uuid)
    assert poll["success"] and poll["http_status"] == 200


def too_close(arrivals: list[float], gap: float) -> list[float]:
    """The spacings between consecutive requests the service saw that are under `gap`."""
    return [round(b - a, 3) for a, b in itertools.pairwise(arrivals) if b - a < gap]


@pytest.mark.parametrize("fault", ["fail_next_500", "fail_next_429"])
def test_a_retried_poll_waits_out_the_gap_since_the_last_request(ingest, fault):
    ing = ingest
    ing.configure(INGEST_MIN_POLL_GAP_SEC=2)
    ing.sim.faults.min_poll_interval = 0  # the spacing is checked on the arrivals instead
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.sim.publish_call(uuid)
    time.sleep(1.1)  # published from the next whole second
    ing.follow(uuid)
    setattr(ing.sim.faults, fault, 1)
    ing.sim.faults.retry_after = 1  # a 429 asks for 1 s: less than the gap
    assert ing.poll() == "ok"
    arrivals = ing.sim.arrivals(f"playlist_uuid={uuid}")
    assert len(arrivals) == 2, "one failure, one retry"
    assert too_close(arrivals, 2) == []
    # A first try keeps the gap too, even when the database would let the poll go.
    ing.sql("UPDATE bcfy_playlists SET last_polled_at = NULL")
    assert ing.poll() == "ok"
    arrivals = ing.sim.arrivals(f"playlist_uuid={uuid}")
    assert len(arrivals) == 3
    assert too_close(arrivals, 2) == []
    assert len(ing.stored_urls()) == 1 and ing.sim.billed_records == 1
    assert [p["success"] for p in ing.polls(uuid)] == [True, True]


def poll_from_two_hosts(ing: Ingest, uuid: str, seconds: float) -> None:
    """Two runs polling one playlist at once for `seconds`, each as often as its claim lets
    it, each with its own API client: as on two hosts, each remembering only its requests."""
    from tasks.ingest.polling import poll_playlist

    rt = Runtime.current()

    async def host(api: BroadcastifyClient) -> None:
        ctx = direct_context(POLL)  # the two runs overlap as if on two hosts
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            await poll_playlist(ctx, api, uuid)
            await asyncio.sleep(0.05)

    async def both() -> None:
        await asyncio.gather(
            *(host(BroadcastifyClient.from_settings(rt.settings, rt.http)) for _ in range(2))
        )

    rt.run(both())


def test_two_overlapping_runs_on_two_hosts_never_poll_within_the_gap(ingest):
    ing = ingest
    ing.configure(INGEST_MIN_POLL_GAP_SEC=2)
    ing.sim.faults.min_poll_interval = 0
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.follow(uuid)
    for _ in range(3):
        ing.sim.publish_call(uuid)
    ing.sim.faults.fail_next_500 = 3  # retries, spread over the two hosts' polls
    poll_from_two_hosts(ing, uuid, 9)
    arrivals = ing.sim.arrivals(f"playlist_uuid={uuid}")
    assert len(arrivals) >= 4, "both hosts polled, failures retried"
    assert too_close(arrivals, 2) == []
    served = ing.served_calls(uuid)
    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in served)
    assert len(served) == 3 and ing.sim.billed_records == 3


def test_a_retry_is_not_sent_once_another_host_has_claimed_the_playlist(ingest):
    ing = ingest
    # A claim holds a playlist for 0.5 + 1 s; a 429 asks for 3 s, so the other host's claim
    # comes first and the retry must not follow it within the gap.
    ing.configure(
        INGEST_MIN_POLL_GAP_SEC=1,
        HTTP_CONNECT_TIMEOUT_SEC=0.5,
        HTTP_READ_TIMEOUT_SEC=0.5,
        HTTP_TOTAL_TIMEOUT_SEC=0.5,
    )
    ing.sim.faults.min_poll_interval = 0
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.follow(uuid)
    ing.sim.publish_call(uuid)
    ing.sim.faults.fail_next_429, ing.sim.faults.retry_after = 1, 3
    poll_from_two_hosts(ing, uuid, 5)
    arrivals = ing.sim.arrivals(f"playlist_uuid={uuid}")
    assert len(arrivals) >= 3
    assert too_close(arrivals, 1) == []
    refused = [p for p in ing.polls(uuid) if "ClaimLost" in (p["error"] or "")]
    assert len(refused) == 1, "the retry was not sent"
    served = ing.served_calls(uuid)
    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in served)
    assert len(served) == 1 and ing.sim.billed_records == 1


def test_a_request_failing_past_its_retries_fails_the_poll_and_loses_nothing(ingest_manual):
    ing = ingest_manual
    ing.configure(BCFY_RETRY_ATTEMPTS=3)
    uuid = ing.follow_a_quiet_playlist()
    cursor = ing.cursor(uuid)
    ing.sim.publish_call(uuid)
    ing.advance(2)
    ing.sim.faults.fail_next_500 = 5
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == 1 + 3
    failed = ing.polls(uuid)[-1]
    assert not failed["success"] and failed["http_status"] == 500
    assert "HTTP 500" in failed["error"] and failed["pos_sent"] == cursor
    assert ing.cursor(uuid) == cursor
    (outcome, error) = ing.runs(POLL)[-1]
    assert outcome == "error" and uuid in error
    ing.sim.faults.fail_next_500 = 0
    ing.advance(10)
    assert ing.poll() == "ok"
    assert len(ing.stored_urls()) == 1 and ing.sim.billed_records == 1


@pytest.mark.parametrize(
    ("fault", "text"),
    [("malformed_json_next", "malformed JSON"), ("error_in_200", "error 404")],
)
def test_malformed_json_and_errors_in_a_200_fail_the_poll_without_retry(ingest_manual, fault, text):
    ing = ingest_manual
    ing.sim.faults.error_in_200_code = 404
    uuid = ing.sim.add_playlist(calls_per_minute=20)
    ing.advance(30)
    ing.follow(uuid)
    ing.poll_every_10s(1)
    setattr(ing.sim.faults, fault, 1)
    cursor = ing.cursor(uuid)
    ing.advance(30)
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == 2, "not retried"
    failed = ing.polls(uuid)[-1]
    assert not failed["success"] and text in failed["error"]
    assert ing.cursor(uuid) == cursor
    ing.advance(10)
    ing.poll_every_10s(2)
    assert sorted(ing.stored_urls(uuid)) == sorted(c["url"] for c in ing.served_calls(uuid))
    assert ing.sim.billed_records == len(ing.stored_urls(uuid))


def test_an_unknown_key_is_a_configuration_error_not_a_retry_loop(ingest):
    ing = ingest
    ing.configure(BCFY_API_KEY_ID="no-such-key")
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.sql("INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'x')", uuid)
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == 1
    (_, error) = ing.runs(POLL)[-1]
    assert "ConfigurationError" in error
    assert "BCFY_API_KEY_ID" in error and "108" in error
    assert "BCFY_API_KEY_ID" in ing.polls(uuid)[-1]["error"]
    # The next run does not ask again with the same key.
    ing.sql("UPDATE bcfy_playlists SET last_polled_at = NULL")
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == 1
    assert "BCFY_API_KEY_ID" in ing.runs(POLL)[-1][1]


def test_missing_credentials_say_which(ingest):
    ing = ingest
    ing.configure(BCFY_API_KEY="", BCFY_APP_ID="")
    uuid = ing.sim.add_playlist()
    ing.sql("INSERT INTO bcfy_playlists (uuid) VALUES (%s)", uuid)
    assert ing.poll() == "error"
    error = ing.runs(POLL)[-1][1]
    assert "BCFY_API_KEY, BCFY_APP_ID" in error
    assert ing.sim.requests["live"] == 0


def test_a_rejected_token_is_made_again_once(ingest_manual):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.follow(uuid)  # the first token
    minted = ing.api.tokens_minted
    ing.sim.faults.error_in_200, ing.sim.faults.error_in_200_code = 1, 103
    assert ing.poll() == "ok"
    assert ing.api.tokens_minted == minted + 1
    ing.advance(10)
    ing.sim.faults.error_in_200 = 2  # rejected again with the new token: give up, loudly
    live_before = ing.sim.requests["live"]
    assert ing.poll() == "error"
    assert ing.sim.requests["live"] == live_before + 2
    assert "token rejected twice" in ing.polls(uuid)[-1]["error"]


def test_a_token_near_expiry_is_replaced_before_it_is_used(ingest_manual, caplog):
    ing = ingest_manual
    ing.configure(BCFY_JWT_LIFETIME_SEC=300, BCFY_JWT_RENEW_MARGIN_SEC=60)
    uuid = ing.sim.add_playlist(calls_per_minute=6)
    ing.follow(uuid)
    assert ing.poll() == "ok"
    assert ing.api.tokens_minted == 1
    ing.advance(200)
    assert ing.poll() == "ok"
    assert ing.api.tokens_minted == 1  # still good for 100 s
    ing.advance(50)  # 250 s old: inside the 60 s margin of its 300 s
    assert ing.poll() == "ok"
    assert ing.api.tokens_minted == 2
    ing.advance(1000)  # long expired by now: replaced before the request, not after a 103
    assert ing.poll() == "ok"
    assert ing.api.tokens_minted == 3
    assert "token rejected" not in caplog.text
    assert all(p["success"] for p in ing.polls(uuid))


def test_a_private_playlist_needs_the_user_login(ingest_manual):
    ing = ingest_manual
    uuid = ing.sim.add_playlist(public=False, calls_per_minute=0)
    ing.sim.publish_call(uuid)
    ing.advance(2)
    ing.sql("INSERT INTO bcfy_playlists (uuid) VALUES (%s)", uuid)
    assert ing.poll() == "error"
    assert "not public" in ing.polls(uuid)[-1]["error"]
    ing.configure(BCFY_USERNAME="demo", BCFY_PASSWORD="demo")
    ing.advance(10)
    assert ing.poll() == "ok"
    assert len(ing.stored_urls(uuid)) == 1


def test_a_playlist_polled_under_5s_ago_is_not_polled_again(ingest):
    ing = ingest
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    ing.follow(uuid)
    assert ing.poll() == "ok"
    assert ing.poll() == "ok"  # a trigger right after the tick
    assert ing.sim.requests["live"] == 1
    assert len(ing.polls(uuid)) == 1
    assert ing.sim.requests.get("poll_too_soon", 0) == 0
    ing.sql("UPDATE bcfy_playlists SET last_polled_at = now() - interval '5.1 seconds'")
    ing.sim.faults.min_poll_interval = 0  # the simulator's own clock says it is too soon
    assert ing.poll() == "ok"
    assert ing.sim.requests["live"] == 2


def test_paused_and_removed_playlists_are_not_polled(ingest_manual):
    ing = ingest_manual
    a, b = ing.sim.add_playlist(calls_per_minute=10), ing.sim.add_playlist(calls_per_minute=10)
    ing.advance(60)
    ing.follow(a)
    ing.follow(b)
    ing.sql("UPDATE bcfy_playlists SET sync = false WHERE uuid = %s", b)
    ing.poll_every_10s(2)
    assert {p["playlist_uuid"] for p in ing.polls()} == {uuid_mod.UUID(a)}
    ing.sql("DELETE FROM bcfy_playlists WHERE uuid = %s", a)
    before = ing.sim.requests["live"]
    ing.poll_every_10s(1)
    assert ing.sim.requests["live"] == before


def test_one_failing_playlist_does_not_stop_the_others(ingest_manual):
    ing = ingest_manual
    good = [ing.sim.add_playlist(calls_per_minute=20) for _ in range(3)]
    ing.advance(60)
    for uuid in good:
        ing.follow(uuid)
    unknown = str(uuid_mod.uuid4())
    ing.sql("INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'gone')", unknown)
    for _ in range(3):
        assert ing.poll() == "error"
        ing.advance(10)
    for uuid in good:
        assert len(ing.stored_urls(uuid)) == len(ing.served_calls(uuid)) > 0
    failed = ing.polls(unknown)
    assert len(failed) == 3 and not any(p["success"] for p in failed)
    assert "unknown playlist" in failed[0]["error"]
    _, error = ing.runs(POLL)[-1]
    assert "PollsFailed: 1 of 4 playlists failed" in error and unknown in error


def overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def poll_intervals(ing: Ingest) -> list[tuple[float, float]]:
    return [(p["poll_started_at"].timestamp(), p["poll_ended_at"].timestamp()) for p in ing.polls()]


def test_playlists_are_polled_concurrently_within_the_bound(ingest):
    ing = ingest
    ing.configure(INGEST_POLL_CONCURRENCY=2)
    ing.sim.faults.latency = 0.4
    for _ in range(6):
        ing.follow(ing.sim.add_playlist(calls_per_minute=0))
    assert ing.poll() == "ok"
    assert len(ing.polls()) == 6
    assert overlap(poll_intervals(ing)) == 2


def test_no_database_connection_is_held_across_a_request(ingest):
    ing = ingest
    # One connection in the pool, four polls at once, each request taking a second: they can
    # only overlap if none holds the connection while it waits for the service.
    ing.configure(DB_POOL_MIN_SIZE=1, DB_POOL_MAX_SIZE=1, INGEST_POLL_CONCURRENCY=4)
    for _ in range(4):
        ing.follow(ing.sim.add_playlist(calls_per_minute=0))
    ing.sim.faults.latency = 1.0
    assert ing.poll() == "ok"
    assert overlap(poll_intervals(ing)) == 4  # all four requests in flight at once


def audio_triggers(ing: Ingest) -> int:
    return ing.services.queued_tasks("audio").count("tasks.audio.process_pending_audio")


def test_new_calls_trigger_the_audio_job_once_stored(ingest_manual):
    ing = ingest_manual
    uuid = ing.follow_a_quiet_playlist()
    assert audio_triggers(ing) == 0  # nothing stored, nothing to do
    ing.sim.publish_call(uuid)
    ing.advance(2)
    ing.poll_every_10s(1)
    assert audio_triggers(ing) == 1
    (pending,) = ing.sql("SELECT count(*) FROM call_audio WHERE state = 'pending'")[0]
    assert pending == 1  # 003's trigger made the audio row with the call
    ing.poll_every_10s(1)
    assert audio_triggers(ing) == 1


def test_the_secret_and_tokens_never_reach_logs_or_tables(ingest_manual, caplog):
    ing = ingest_manual
    caplog.set_level(logging.DEBUG)
    uuid = ing.sim.add_playlist(calls_per_minute=10)
    ing.advance(30)
    ing.follow(uuid)
    ing.sim.faults.fail_next_429, ing.sim.faults.retry_after = 1, 0
    ing.sim.faults.error_in_200, ing.sim.faults.error_in_200_code = 2, 103
    ing.poll()
    tokens = [ing.api._token]
    ing.advance(10)
    ing.configure(BCFY_API_KEY_ID="wrong")
    ing.poll()
    tokens.append(ing.api._token)
    assert all(tokens)
    texts = caplog.text
    texts += "".join(str(p["error"]) for p in ing.polls())
    texts += "".join(str(e) for _, e in ing.runs(POLL))
    assert "BCFY_API_KEY_ID" in texts and "token rejected" in texts  # the errors were logged
    assert SECRET not in texts
    assert not any(token in texts for token in tokens)
    assert "Bearer" not in texts
