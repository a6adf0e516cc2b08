"""Back-fill after downtime: a cursor older than the live endpoint answers for is caught up from
group_archives in windows of at most 8 h, with no call lost and none read twice, at the seam
or anywhere; an interrupted back-fill resumes where it stopped."""

from __future__ import annotations

import itertools
import math

from tests.support.ingest import Ingest

HOUR = 3600
RETENTION = 600


def with_retention(ing: Ingest, age: int = RETENTION) -> None:
    """The service answers a live `pos` only this far back; the settings say so too."""
    ing.sim.faults.max_pos_age = age
    ing.configure(
        INGEST_LIVE_MAX_POS_AGE_SEC=age,
        BCFY_RETRY_BUDGET_SEC=5,
        HTTP_READ_TIMEOUT_SEC=5,
        HTTP_TOTAL_TIMEOUT_SEC=5,
    )


def drain(ing: Ingest, runs: int = 20) -> None:
    for _ in range(runs):
        if not ing.sql("SELECT 1 FROM bcfy_backfill"):
            return
        ing.backfill()
    raise AssertionError(f"gaps left after {runs} back-fill runs")


def groups_of(ing: Ingest, uuid: str) -> list[str]:
    (groups,) = ing.sql("SELECT groups FROM bcfy_playlists WHERE uuid = %s", uuid)[0]
    return sorted(g["groupId"] for g in groups)


def assert_each_call_once(ing: Ingest, uuid: str, since: int) -> list[str]:
    """Every call after `since` up to the cursor stored, each stored and read exactly once."""
    stored = ing.stored_urls(uuid)
    assert len(stored) == len(set(stored))
    cursor = ing.cursor(uuid)
    published = [c for c in ing.sim.calls(uuid) if since < c["ts"] <= cursor]
    missing = {c["url"] for c in published} - set(stored)
    assert not missing, f"{len(missing)} calls lost"
    served = ing.served_calls(uuid)
    assert sorted(stored) == sorted(c["url"] for c in served)
    twice = [c for c in served if ing.sim.served_count(c) > 1]
    assert not twice, f"{len(twice)} calls read twice, e.g. ts {twice[0]['ts']}"
    assert ing.sim.billed_records == len(stored)
    return stored


def followed_and_polled(ing: Ingest, calls_per_minute: int, polls: int) -> tuple[str, int]:
    """With retention: a playlist with a minute of calls already, followed, then polled every
    10 s `polls` times; returns its uuid and where its first poll ended (last_pos)."""
    with_retention(ing)
    uuid = ing.sim.add_playlist(calls_per_minute=calls_per_minute)
    ing.advance(60)
    ing.follow(uuid)
    ing.poll_every_10s(polls)
    return uuid, ing.polls(uuid)[0]["last_pos"]


def back_after(ing: Ingest, away: float) -> tuple[str, int]:
    """followed_and_polled (four calls a minute, two polls), then `away` seconds without a poll
    and one poll on return: the gap waits for back-fill."""
    uuid, first = followed_and_polled(ing, 4, 2)
    ing.advance(away)
    ing.poll_every_10s(1)
    return uuid, first


def test_downtime_past_retention_is_back_filled_exactly_once(ingest_manual):
    ing = ingest_manual
    uuid, first = followed_and_polled(ing, 6, 6)
    before = ing.cursor(uuid)

    # 20 hours away. Calls go on; in the last 30 s one every second, so that whichever second
    # the seam falls on, there are calls on it and on either side.
    ing.advance(20 * HOUR - 30)
    for _ in range(30):
        ing.sim.publish_call(uuid)
        ing.advance(1)
    assert ing.poll() == "ok"
    gaps = ing.sql("SELECT group_id, next_ts, until_ts FROM bcfy_backfill ORDER BY group_id")
    assert [g for g, _, _ in gaps] == groups_of(ing, uuid) and len(gaps) == 3
    ((_, _, seam),) = {(0, n, u) for _, n, u in gaps}
    assert {n for _, n, _ in gaps} == {before + 1}
    assert ing.clock() - 15 < seam < ing.clock() - 5  # just behind the service's present
    # The poll said so to whoever runs back-fill: a trigger is queued.
    assert "tasks.ingest.backfill_gaps" in ing.services.queued_tasks("ingest")
    # Live polling went on from the seam at once.
    live = ing.polls(uuid)[-1]
    assert live["pos_sent"] == seam and live["calls_new"] > 0

    ing.advance(10)
    drain(ing)
    ing.poll_every_10s(3)
    assert_each_call_once(ing, uuid, since=first)
    around = [c for c in ing.sim.calls(uuid) if seam - 2 <= c["ts"] <= seam + 2]
    assert len(around) >= 5

    # Windows of at most 8 h that tile each group's gap: no hole, no overlap.
    assert ing.sim.requests["group_archives"] == 3 * 3  # 20 h = three windows, per group
    for group in groups_of(ing, uuid):
        windows = ing.sql(
            "SELECT window_start, window_end FROM bcfy_playlist_poll_log"
            " WHERE mode = 'backfill' AND group_id = %s AND success ORDER BY window_start",
            group,
        )
        assert windows[0][0] == before + 1 and windows[-1][1] == seam
        for (_, end), (start, _) in itertools.pairwise(windows):
            assert start == end + 1
        assert all(end - start < 28_800 for start, end in windows)


def test_a_short_outage_is_caught_up_live_without_back_fill(ingest_manual):
    ing = ingest_manual
    uuid, first = followed_and_polled(ing, 12, 3)
    ing.advance(RETENTION - 60)
    ing.poll_every_10s(2)
    assert ing.sim.requests.get("group_archives", 0) == 0
    assert not ing.sql("SELECT 1 FROM bcfy_backfill")
    assert_each_call_once(ing, uuid, since=first)


def test_an_interrupted_back_fill_resumes_without_reading_a_window_twice(ingest_manual):
    ing = ingest_manual
    ing.configure(BCFY_RETRY_ATTEMPTS=1, INGEST_BACKFILL_CONCURRENCY=2)
    uuid, first = back_after(ing, 30 * HOUR)

    ing.sim.faults.fail_next_500 = 2  # the first two archive reads fail
    assert ing.backfill() == "error"
    failed = ing.sql("SELECT attempts, last_error FROM bcfy_backfill WHERE attempts > 0")
    assert len(failed) == 2 and all("HTTP 500" in e for _, e in failed)
    left = ing.sql("SELECT count(*) FROM bcfy_backfill")[0][0]
    assert left == 2, "the third group went on to the end"
    # A failing gap waits before its next try; here the test skips the wait.
    assert ing.backfill() == "ok"
    assert ing.sql("SELECT count(*) FROM bcfy_backfill")[0][0] == 2
    ing.sql("UPDATE bcfy_backfill SET updated_at = now() - interval '1 hour'")
    drain(ing)
    ing.poll_every_10s(2)
    assert_each_call_once(ing, uuid, since=first)
    (outcome, error) = ing.runs("tasks.ingest.backfill_gaps")[0]
    assert outcome == "error" and "2 archive reads failed" in error


def test_a_back_fill_cut_short_by_its_budget_goes_on_next_run(ingest_manual):
    ing = ingest_manual
    ing.configure(INGEST_BACKFILL_BUDGET_SEC=1, INGEST_BACKFILL_CONCURRENCY=1)
    uuid, first = back_after(ing, 40 * HOUR)
    windows = sum(
        math.ceil((until - start + 1) / 28_800)
        for start, until in ing.sql("SELECT next_ts, until_ts FROM bcfy_backfill")
    )
    assert windows == 3 * 6  # 40 h and a few seconds, three groups
    ing.sim.faults.latency = 0.4
    assert ing.backfill() == "ok"
    done = ing.sim.requests["group_archives"]
    assert 1 <= done < windows, "stopped at its budget"
    runs = 1
    while ing.sql("SELECT 1 FROM bcfy_backfill"):
        assert ing.backfill() == "ok"
        runs += 1
    assert runs > 1
    assert ing.sim.requests["group_archives"] == windows
    ing.sim.faults.latency = 0
    ing.poll_every_10s(2)
    assert_each_call_once(ing, uuid, since=first)


def test_a_gap_the_answer_reveals_is_back_filled_too(ingest_manual):
    """Our clock lags the service's, so the cursor looks young enough to send as it is; the
    answer's serverTime shows what the service left out, and that gap is back-filled."""
    ing = ingest_manual
    uuid, first = followed_and_polled(ing, 6, 2)
    ing.advance(RETENTION + 300)
    ing.reset_runtime()  # a restarted worker: it has not seen the service's clock yet
    ing.api.clock = lambda: ing.clock() - 400
    assert ing.poll() == "ok"
    (sent, server_time) = ing.sql(
        "SELECT pos_sent, server_time FROM bcfy_playlist_poll_log ORDER BY id DESC LIMIT 1"
    )[0]
    gaps = ing.sql("SELECT next_ts, until_ts FROM bcfy_backfill")
    assert gaps and {g for g in gaps} == {(sent + 1, server_time - RETENTION)}
    drain(ing)
    ing.advance(10)
    ing.poll_every_10s(2)
    assert_each_call_once(ing, uuid, since=first)


def test_a_paused_playlist_keeps_its_gap_and_a_removed_one_drops_it(ingest_manual):
    ing = ingest_manual
    with_retention(ing)
    uuid = ing.sim.add_playlist(calls_per_minute=2)
    ing.advance(60)
    ing.follow(uuid)
    ing.poll_every_10s(1)
    ing.advance(10 * HOUR)
    ing.poll_every_10s(1)
    ing.sql("UPDATE bcfy_playlists SET sync = false")
    assert ing.backfill() == "ok"
    assert ing.sim.requests.get("group_archives", 0) == 0
    assert len(ing.sql("SELECT 1 FROM bcfy_backfill")) == 3
    ing.sql("DELETE FROM bcfy_playlists")
    assert not ing.sql("SELECT 1 FROM bcfy_backfill")


def test_groups_seen_in_answers_are_back_filled_too(ingest_manual):
    ing = ingest_manual
    with_retention(ing)
    uuid = ing.sim.add_playlist(calls_per_minute=12)
    ing.advance(60)
    all_groups = sorted({c["groupId"] for c in ing.sim.calls(uuid)})
    assert len(all_groups) == 3
    ing.follow(uuid, groups=all_groups[:1])  # what was stored when it was added: one group
    ing.poll_every_10s(6)
    first = ing.polls(uuid)[0]["last_pos"]
    assert groups_of(ing, uuid) == all_groups  # learnt from the calls served
    ing.advance(3 * HOUR)
    ing.poll_every_10s(1)
    assert sorted(g for (g,) in ing.sql("SELECT group_id FROM bcfy_backfill")) == all_groups
    drain(ing)
    ing.poll_every_10s(1)
    assert_each_call_once(ing, uuid, since=first)
