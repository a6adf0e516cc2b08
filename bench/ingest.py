"""Ingestion's two headline figures, each against baselines measured in the same run.

    python bench/ingest.py [--rounds 15] [--page 1000] [--hours 24] [--seed 5]

1. Storage rate: calls stored per second from live pages of 1,000 records, served by the feed
   simulator over HTTP and decoded by the API client, then stored
     * by the real ingest path: validation, one INSERT ... ON CONFLICT DO NOTHING per page, the
       cursor and the poll log row, one commit (tasks.ingest.storage.store_page);
     * baseline: one INSERT per row, the page in one transaction (the fastest per-row form);
     * baseline: one INSERT per row, each committed (per-row as a per-call ingest writes it);
     * baseline: COPY of the same rows (the bulk-load ceiling; no conflict handling).
   Every method validates the page first, writes the same columns, fires 003's audio trigger,
   and commits the cursor and a poll log row. Methods are interleaved round by round, in an
   order that rotates from round to round; each rate is printed as median (min\u2013max).
   Also shown: the ingest path end to end, the HTTP fetch of the page included.
2. Read efficiency: billed call records per stored call over a long simulated run (a
   ManualClock): four playlists, the real jobs (poll every 10 s, back-fill when triggered),
   the service's retention limit (10 minutes), random outages from 20 s to 4 h (each a
   restart: a new runtime, no token, no known server time), and injected 429s, 500s and
   malformed answers. Baseline in the same run: polling without a cursor (the service's
   5-minute window), as a client that does not keep one does.

Goals: at least 25x the per-row rate, at least 30 % of COPY (ratios of the medians of the same
run), at most 1.01 billed reads per stored call. Results: bench/results/ingest.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, report, rotated, run_bench, servers, spread
from workers.core.rows import one_row
from workers.dev.services import Servers
from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator, ManualClock

KEY_ID = next(iter(DEMO_API_KEYS))
SECRET, APP_ID = DEMO_API_KEYS[KEY_ID]
T0 = 1_750_000_000.0

COLUMNS = (
    "playlist_uuid, group_id, call_ts, started_at, ended_at, duration_sec, url, sid, site_id,"
    " node_id, feed_id, tg_id, tag, freq, src, descr, display, grouping, size_bytes, raw"
)
ROW_INSERT = (
    f"INSERT INTO bcfy_calls_raw ({COLUMNS}) VALUES (%s, %s, %s, to_timestamp(%s),"
    " to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
    " ON CONFLICT DO NOTHING"
)
CURSOR = (
    "UPDATE bcfy_playlists SET cursor_pos = GREATEST(COALESCE(cursor_pos, 0), %s) WHERE uuid = %s"
)
POLL_LOG = (
    "INSERT INTO bcfy_playlist_poll_log (playlist_uuid, poll_started_at, poll_ended_at, success,"
    " calls_received, calls_new) VALUES (%s, %s, now(), true, %s, %s)"
)


def row_values(uuid: str, r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        uuid, r["g"], r["ts"], r["st"], r["en"], r["d"], r["url"], r["sid"], r["site"],
        r["node"], r["feed"], r["tg"], r["tag"], r["freq"], r["src"], r["descr"], r["display"],
        r["gr"], r["size"], json.dumps(r["raw"]),
    )  # fmt: skip


def copy_values(uuid: str, r: dict[str, Any]) -> tuple[Any, ...]:
    values = list(row_values(uuid, r))
    values[3] = datetime.fromtimestamp(r["st"], UTC)
    values[4] = None if r["en"] is None else datetime.fromtimestamp(r["en"], UTC)
    return tuple(values)


# --- 1. storage rate ----------------------------------------------------------------------------


async def storage_rate(services: Servers, rounds: int, page_size: int) -> dict[str, list[float]]:
    """Calls stored per second, per method, one figure per round."""
    from tasks.ingest.storage import PollRecord, store_page
    from tasks.ingest.validation import split_page
    from workers.clients.broadcastify import BroadcastifyClient
    from workers.core.settings import load_settings

    clock = ManualClock(T0)
    sim = FeedSimulator(clock=clock, seed=1).start()
    settings = load_settings({**os.environ, "BCFY_API_BASE": sim.url})
    sim.faults.min_poll_interval = 0
    uuid = sim.add_playlist(name="bench", calls_per_minute=0)
    http = httpx.AsyncClient(timeout=30)
    api = BroadcastifyClient.from_settings(settings, http, clock=clock)
    conn = await psycopg.AsyncConnection.connect(services.database_url)
    autocommit = await psycopg.AsyncConnection.connect(services.database_url, autocommit=True)
    await conn.execute("INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'bench')", (uuid,))
    await conn.commit()
    cursor: int | None = int(clock()) - 1

    async def fetch() -> tuple[Any, float]:
        nonlocal cursor
        for _ in range(page_size):
            sim.publish_call(uuid)
        clock.advance(2)
        t0 = time.perf_counter()
        page = await api.live_calls(uuid, pos=cursor)
        took = time.perf_counter() - t0
        assert len(page.calls) == page_size
        cursor = page.last_pos
        return page, took

    async def ingest_path(page: Any) -> None:
        records = split_page(page.calls, page.server_time + 86400)
        poll = PollRecord(uuid, datetime.now(UTC), "pos", page.status, cursor, page.last_pos)
        stored = await store_page(conn, poll, records, new_cursor=page.last_pos)
        await conn.commit()
        assert stored.new == page_size

    async def per_row(page: Any) -> None:
        records = split_page(page.calls, page.server_time + 86400)
        started = datetime.now(UTC)
        for r in records.rows:
            await conn.execute(ROW_INSERT, row_values(uuid, r))
        await conn.execute(CURSOR, (page.last_pos, uuid))
        await conn.execute(POLL_LOG, (uuid, started, page_size, page_size))
        await conn.commit()

    async def per_row_committed(page: Any) -> None:
        records = split_page(page.calls, page.server_time + 86400)
        started = datetime.now(UTC)
        for r in records.rows:
            await autocommit.execute(ROW_INSERT, row_values(uuid, r))
        async with autocommit.transaction():
            await autocommit.execute(CURSOR, (page.last_pos, uuid))
            await autocommit.execute(POLL_LOG, (uuid, started, page_size, page_size))

    async def copy(page: Any) -> None:
        records = split_page(page.calls, page.server_time + 86400)
        started = datetime.now(UTC)
        async with conn.cursor() as cur:
            async with cur.copy(f"COPY bcfy_calls_raw ({COLUMNS}) FROM STDIN") as out:
                for r in records.rows:
                    await out.write_row(copy_values(uuid, r))
        await conn.execute(CURSOR, (page.last_pos, uuid))
        await conn.execute(POLL_LOG, (uuid, started, page_size, page_size))
        await conn.commit()

    methods = {
        "ingest path (one statement per page)": ingest_path,
        "baseline: INSERT per row, one txn": per_row,
        "baseline: INSERT per row, committed": per_row_committed,
        "baseline: COPY": copy,
    }
    rates: dict[str, list[float]] = {name: [] for name in methods}
    end_to_end: list[float] = []
    try:
        for method in methods.values():  # warm up: plans, caches, connections
            await method((await fetch())[0])
        for round_no in range(rounds):
            for name, method in rotated(list(methods.items()), round_no):
                page, fetch_took = await fetch()
                t0 = time.perf_counter()
                await method(page)
                took = time.perf_counter() - t0
                rates[name].append(page_size / took)
                if method is ingest_path:
                    end_to_end.append(page_size / (took + fetch_took))
        stored_rows = await conn.execute("SELECT count(*) FROM bcfy_calls_raw")
        (stored,) = one_row(await stored_rows.fetchone())
        (audio,) = one_row(await (await conn.execute("SELECT count(*) FROM call_audio")).fetchone())
        assert stored == audio == page_size * (rounds + 1) * len(methods)
        await conn.execute(
            "TRUNCATE bcfy_calls_raw, bcfy_playlists, bcfy_playlist_poll_log, job_runs CASCADE"
        )
        await conn.commit()
    finally:
        await conn.close()
        await autocommit.close()
        await http.aclose()
        sim.stop()
    rates["ingest path, HTTP fetch included"] = end_to_end
    return rates


# --- 2. read efficiency ---------------------------------------------------------------------------


def read_efficiency(hours: float, seed: int) -> dict[str, Any]:
    """The real jobs on a ManualClock over `hours`, with outages and faults."""
    from tasks.ingest.jobs import backfill_gaps, poll_followed_playlists
    from workers.cli.playlists import _add
    from workers.core.runtime import Runtime
    from workers.core.settings import reset_settings_cache

    rng = random.Random(seed)
    clock = ManualClock(T0)
    sim = FeedSimulator(clock=clock, seed=seed).start()
    sim.faults.max_pos_age = 600
    os.environ["BCFY_API_BASE"] = sim.url
    reset_settings_cache()

    def fresh_runtime() -> Any:
        Runtime.shutdown_current()
        rt = Runtime.current()
        rt.bcfy_api.clock = clock
        return rt

    rt = fresh_runtime()
    playlists = [
        sim.add_playlist(name=f"p{rate}", calls_per_minute=rate) for rate in (2, 6, 20, 60)
    ]
    clock.advance(600)
    for uuid in playlists:
        rt.run(_add(uuid))
    db = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)

    def gaps() -> int:
        (n,) = one_row(db.execute("SELECT count(*) FROM bcfy_backfill").fetchone())
        return int(n)

    end = clock() + hours * 3600
    ticks = outages = restarts_long = faults = backfill_runs = 0
    down_until = 0.0
    wall = time.monotonic()
    while clock() < end:
        if clock() < down_until:
            clock.advance(10)
            continue
        if rng.random() < 1 / 360:  # about one outage an hour
            outages += 1
            long = rng.random() < 0.3
            restarts_long += long
            down_until = clock() + (rng.uniform(900, 4 * 3600) if long else rng.uniform(20, 300))
            rt = fresh_runtime()  # the worker restarts: no token, no known server time
            continue
        roll = rng.random()
        if roll < 0.01:
            sim.faults.fail_next_500 = 1
            faults += 1
        elif roll < 0.015:
            sim.faults.malformed_json_next = 1
            faults += 1
        elif roll < 0.02:
            sim.faults.fail_next_429, sim.faults.retry_after = 1, 0
            faults += 1
        poll_followed_playlists.apply()
        ticks += 1
        while gaps():
            backfill_gaps.apply()  # what the poll's trigger does
            backfill_runs += 1
        clock.advance(10)
    down_until = max(down_until, clock())
    clock.advance(down_until - clock() + 10)  # the last outage ends; the last poll
    poll_followed_playlists.apply()
    while gaps():
        backfill_gaps.apply()
        backfill_runs += 1
    wall = time.monotonic() - wall

    stored = {u for (u,) in db.execute("SELECT url FROM bcfy_calls_raw").fetchall()}
    (rows,) = one_row(db.execute("SELECT count(*) FROM bcfy_calls_raw").fetchone())
    first_pos: dict[str, int] = dict(
        db.execute(
            "SELECT DISTINCT ON (playlist_uuid) playlist_uuid::text, last_pos"
            " FROM bcfy_playlist_poll_log WHERE mode = 'init' AND success"
            " ORDER BY playlist_uuid, id"
        ).fetchall()
    )
    cursors: dict[str, int] = dict(
        db.execute("SELECT uuid::text, cursor_pos FROM bcfy_playlists").fetchall()
    )
    expected = {
        c["url"]
        for uuid in playlists
        for c in sim.calls(uuid)
        if first_pos[uuid] < c["ts"] <= cursors[uuid]
    }
    served_twice = sum(1 for uuid in playlists for c in sim.calls(uuid) if sim.served_count(c) > 1)
    polls = db.execute(
        "SELECT mode, count(*), sum(calls_received) FROM bcfy_playlist_poll_log GROUP BY mode"
    ).fetchall()
    (errors,) = one_row(
        db.execute("SELECT count(*) FROM bcfy_playlist_poll_log WHERE NOT success").fetchone()
    )
    db.close()
    billed = sim.billed_records
    sim.stop()
    Runtime.shutdown_current()
    return {
        "hours": hours,
        "ticks": ticks,
        "outages": outages,
        "long outages": restarts_long,
        "injected faults": faults,
        "failed requests": errors,
        "back-fill runs": backfill_runs,
        "requests by mode": {m: int(n) for m, n, _ in polls},
        "records by mode": {m: int(r or 0) for m, _, r in polls},
        "calls stored": rows,
        "calls expected": len(expected),
        "lost": len(expected - stored),
        "duplicates stored": rows - len(stored),
        "calls read more than once": served_twice,
        "billed records": billed,
        "billed per stored": billed / rows,
        "wall seconds": wall,
    }


def cursorless_baseline(hours: float, seed: int) -> float:
    """Billed records per distinct call for a client polling without a cursor every 10 s."""
    clock = ManualClock(T0)
    with FeedSimulator(clock=clock, seed=seed) as sim:
        uuid = sim.add_playlist(calls_per_minute=20)
        now = int(clock())
        import jwt

        token = jwt.encode(
            {"iss": APP_ID, "iat": now, "exp": now + 86400}, SECRET, headers={"kid": KEY_ID}
        )
        seen: set[str] = set()
        with httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {token}"}) as http:
            for _ in range(int(hours * 360)):
                clock.advance(10)
                calls = http.get("/calls/v1/live/", params={"playlist_uuid": uuid}).json()["calls"]
                seen.update(c["url"] for c in calls)
        return sim.billed_records / max(1, len(seen))


# --- report ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()

    with servers() as services:
        os.environ.update(
            {
                "DATABASE_URL": services.database_url,
                "REDIS_URL": services.redis_url,
                "BCFY_API_KEY_ID": KEY_ID,
                "BCFY_API_KEY": SECRET,
                "BCFY_APP_ID": APP_ID,
                "BCFY_API_BASE": "http://127.0.0.1:9",  # set per part below
                "INGEST_MIN_POLL_GAP_SEC": "0",  # the simulator's 5 s rule runs on its clock
                "INGEST_LIVE_MAX_POS_AGE_SEC": "600",
                "BCFY_RETRY_BACKOFF_SEC": "0.01",
                "BCFY_RETRY_BACKOFF_MAX_SEC": "0.05",
                "LOG_LEVEL": "WARNING",
            }
        )
        import logging

        logging.basicConfig(level=logging.ERROR)
        # Injected faults fail some runs on purpose; the poll log counts them.
        logging.getLogger("workers.core.jobs").setLevel(logging.CRITICAL)
        rates = asyncio.run(storage_rate(services, args.rounds, args.page))
        efficiency = read_efficiency(args.hours, args.seed)
        naive = cursorless_baseline(1.0, args.seed)

    medians = {name: statistics.median(r) for name, r in rates.items()}
    ours = medians["ingest path (one statement per page)"]
    per_row = medians["baseline: INSERT per row, one txn"]
    per_row_committed = medians["baseline: INSERT per row, committed"]
    copy = medians["baseline: COPY"]
    lines = [
        heading(
            "ingest", f"page={args.page} rounds={args.rounds} hours={args.hours:g} seed={args.seed}"
        ),
        "",
        f"1. calls stored per second from live pages, {args.rounds} rounds interleaved: median"
        " (min\u2013max)",
        "   (every method validates the page, writes the same columns, fires the audio trigger,",
        "   commits the cursor and a log row)",
        f"{'method':<42}{'calls/s':>24}{'x ingest':>10}",
    ]
    for name, rate in rates.items():
        lines.append(f"{name:<42}{spread(rate, '.0f'):>24}{medians[name] / ours:>10.3f}")
    r_txn, r_commit, of_copy = ours / per_row, ours / per_row_committed, ours / copy

    def paired(baseline: str, scale: float = 1, fmt: str = ".1f") -> str:
        """The ingest path's rate over BASELINE's, round by round (measured back to back)."""
        pairs = zip(rates["ingest path (one statement per page)"], rates[baseline], strict=True)
        return spread((a / b * scale for a, b in pairs), fmt)

    e = efficiency
    lines += [
        "",
        "ratios of the medians; in brackets the same ratio round by round, median (min\u2013max)",
        f"ingest path vs INSERT per row, one txn   : {r_txn:6.1f}x"
        f"  ({paired('baseline: INSERT per row, one txn')})",
        f"ingest path vs INSERT per row, committed : {r_commit:6.1f}x"
        f"  ({paired('baseline: INSERT per row, committed')})",
        f"ingest path vs COPY                      : {of_copy * 100:6.0f} %"
        f"  ({paired('baseline: COPY', 100, '.0f')} %)",
        f"for scale, COPY itself vs INSERT per row, one txn: {copy / per_row:.1f}x",
        "",
        f"2. read efficiency over {e['hours']:g} simulated hours: {e['ticks']} polls of 4 "
        f"playlists, {e['outages']} outages ({e['long outages']} past the 10-minute retention),",
        f"   {e['injected faults']} injected faults, {e['failed requests']} failed requests, "
        f"{e['back-fill runs']} back-fill runs; {e['wall seconds']:.0f} s of wall time",
        f"   requests by mode {e['requests by mode']}  records by mode {e['records by mode']}",
        f"   calls stored {e['calls stored']} (expected {e['calls expected']}, lost {e['lost']},"
        f" stored twice {e['duplicates stored']}), read more than once "
        f"{e['calls read more than once']}",
        f"   billed records {e['billed records']} -> {e['billed per stored']:.4f} per stored call",
        f"   baseline in the same run: polling without a cursor every 10 s bills "
        f"{naive:.1f} records per call",
        "",
        "goals:",
        f"  >= 25x the per-row rate       : {_verdict(r_txn >= 25)} vs per-row in one "
        f"transaction ({r_txn:.1f}x); {_verdict(r_commit >= 25)} vs per-row committed "
        f"({r_commit:.1f}x)",
        f"  >= 30 % of COPY               : {_verdict(of_copy >= 0.30)} ({of_copy * 100:.0f} %)",
        f"  <= 1.01 billed reads per call : {_verdict(e['billed per stored'] <= 1.01)} "
        f"({e['billed per stored']:.4f}; lost {e['lost']})",
    ]
    report("ingest", lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    run_bench(main)
