"""Keyword alerts: what matching costs each stored transcript, and how soon a notification
arrives after its transcript is stored.

    python bench/alerts.py [--rounds 5] [--transcripts 200] [--seconds 60]

Prints, and writes to bench/results/alerts.txt:

  matching  per transcript, the time of workers.alerts.matching.match_transcript (the two
            statements run in the transaction that stores the transcript) with 0, 100 and
            1,000 rules (random queries of radio words: single words, "phrases", `or`, some
            with playlist or group filters), next to the INSERT of the transcript itself
            measured in the same transactions (the baseline). Each transaction is rolled back,
            so every configuration sees the same tables. Goal: under 5 ms with 1,000 rules.
  delivery  from the transcript stored (the outbox row's time, the storing transaction's) to
            the notification received by a local HTTP receiver, at 1 call/s with 100 rules
            (each call matches two of them; half the rules notify a JSON webhook, half Apprise
            json://), through the production path: store_transcript in this process, the
            trigger message, a `bcfy worker notify` pool (default settings). Baseline in the
            same run: a bare POST from this process to the same receiver. Goal: p95 at most
            1 s.

Rounds are the outer loop: each round runs every matching configuration (in an order that
rotates from round to round), then a delivery period; figures are median (min\u2013max) over
the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, report, rotated, run_bench, servers, spread, start_worker

WORDS = (
    "fire structure smoke engine ladder medic alarm crash injury shots pursuit vehicle sedan "
    "unit oak main elm avenue street hospital cardiac arrest overdose burglary water rescue "
    "hazmat gas leak wires down tree flooding working showing roof basement kitchen victim "
    "patrol suspect north south east west bridge highway mile marker ambulance transport "
    "chest pain breathing unconscious fall lift assist commercial residential apartment"
).split()
PLAYLIST = uuid.UUID("11111111-2222-3333-4444-555555555555")
GROUPS = ("7001-101", "7001-102", "7002-201")


def random_query(rng: random.Random) -> str:
    """Most rules watch for something distinctive (a unit, a street), some for a phrase of
    common words: a transcript then matches a few rules, as in a real deployment, not hundreds."""
    unit = f"{rng.choice(('medic', 'engine', 'ladder', 'rescue'))}{rng.randrange(1000)}"
    street = f"{rng.choice(('oak', 'elm', 'main', 'cedar'))}{rng.randrange(1000)}"
    a, b = rng.sample(WORDS, 2)
    return rng.choice([unit, street, f'"{unit} {a}"', f"{unit} or {street}", f'"{a} {b}"'])


def add_rules(conn: psycopg.Connection[Any], n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        (rule_id,) = conn.execute(
            """INSERT INTO alert_rules (name, query, playlist_uuid, group_id)
               VALUES (%s, %s, %s, %s) RETURNING id""",
            (
                f"rule-{i}",
                random_query(rng),
                PLAYLIST if rng.random() < 0.2 else None,
                rng.choice(GROUPS) if rng.random() < 0.2 else None,
            ),
        ).fetchone()  # type: ignore[misc]
        conn.execute(
            "INSERT INTO alert_targets (rule_id, url, shown) VALUES (%s, %s, 'json://…')",
            (rule_id, f"json://127.0.0.1:9/{i}"),
        )


def add_calls(conn: psycopg.Connection[Any], n: int) -> list[int]:
    now = datetime.now(UTC)
    return [
        conn.execute(
            """INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at,
                                           duration_sec, url, raw)
               VALUES (%s, %s, %s, %s, 5.0, %s, '{}') RETURNING id""",
            (PLAYLIST, GROUPS[i % 3], int(now.timestamp()), now, f"https://c.example/{i}.m4a"),
        ).fetchone()[0]  # type: ignore[index]
        for i in range(n)
    ]


async def time_matching(dsn: str, calls: list[int], seed: int) -> tuple[float, float, float]:
    """Medians per transcript of (ms of the transcript's INSERT, ms of match_transcript,
    deliveries made), each transcript in its own transaction, rolled back."""
    from workers.alerts.matching import match_transcript

    rng = random.Random(seed)
    inserts, matches, made = [], [], []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for call_id in calls:
            words = [rng.choice(WORDS) for _ in range(12)]
            words += [f"medic{rng.randrange(1000)}", f"oak{rng.randrange(1000)}"]
            text = " ".join(words)
            t0 = time.perf_counter()
            cur = await conn.execute(
                """INSERT INTO transcripts (call_id, text, backend, model, confidence)
                   VALUES (%s, %s, 'bench', 'bench', 0.8) RETURNING id""",
                (call_id, text),
            )
            (transcript_id,) = await cur.fetchone()  # type: ignore[misc]
            t1 = time.perf_counter()
            made.append(await match_transcript(conn, transcript_id, 10_000))
            t2 = time.perf_counter()
            await conn.rollback()
            inserts.append((t1 - t0) * 1000)
            matches.append((t2 - t1) * 1000)
    return statistics.median(inserts), statistics.median(matches), statistics.median(made)


class Receiver:
    """A local HTTP receiver recording when each notification arrived."""

    def __init__(self) -> None:
        from workers.dev.http_server import BackgroundServer

        self.arrivals: list[tuple[float, str]] = []  # (when, Idempotency-Key)
        self.lock = threading.Lock()
        self.server = BackgroundServer(self.handle, name="bench-receiver")
        self.server.start()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.time()
        await request.read()
        key = request.headers.get("Idempotency-Key")
        if key:
            with self.lock:
                self.arrivals.append((arrived, key))
        return web.Response(text="{}")

    def stop(self) -> None:
        self.server.stop()


def latency_round(
    dsn: str, receiver: Receiver, calls: list[int], seconds: int
) -> tuple[list[float], list[float]]:
    """(delays of notifications, bare POST round trips), seconds. A notification's delay: from
    its outbox row's time (the transaction that stored the transcript) to its arrival, matched
    by its idempotency key (Apprise's JSON body has no fields of ours; its header has the key)."""
    from tasks.transcription.claims import store_transcript
    from workers.alerts.delivery import trigger_alert_delivery
    from workers.core.runtime import Runtime
    from workers.recognizers import Recognition

    rt = Runtime.current()
    with receiver.lock:
        receiver.arrivals.clear()
    bare: list[float] = []
    expected = 0
    start = time.monotonic()
    with httpx.Client() as http:
        for n, call_id in enumerate(calls[:seconds]):
            time.sleep(max(0.0, start + n - time.monotonic()))  # 1 call/s
            text = f"engine respond structure fire tango{n % 100} tango{(n + 37) % 100}"
            stored = rt.run(
                store_transcript(call_id, "bench", Recognition(text, "b", "en", 0.9), 0.1, 10)
            )
            expected += stored.alerts_due
            if stored.alerts_due:
                trigger_alert_delivery(call_id)
            t0 = time.perf_counter()
            http.post(f"http://127.0.0.1:{receiver.server.port}/bare", json={})
            bare.append(time.perf_counter() - t0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with receiver.lock:
            got = list(receiver.arrivals)
        if len(got) >= expected:
            break
        time.sleep(0.1)
    with psycopg.connect(dsn) as conn:
        stored_at: dict[str, float] = dict(
            conn.execute(
                """SELECT d.idempotency_key::text, extract(epoch FROM o.created_at)::float8
                     FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id"""
            ).fetchall()
        )
    delays = [arrived - stored_at[key] for arrived, key in got]
    if len(delays) < expected:
        print(f"  only {len(delays)} of {expected} notifications arrived", flush=True)
    return delays, bare


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--transcripts", type=int, default=200, help="per matching configuration")
    ap.add_argument("--seconds", type=int, default=60, help="of 1 call/s per delivery round")
    args = ap.parse_args()
    configs = [0, 100, 1000]
    matching: dict[int, list[tuple[float, float, float]]] = {n: [] for n in configs}
    delivery: list[tuple[float, float, float]] = []  # p50, p95 of delays; p95 of bare POSTs
    with servers() as srv, contextlib.ExitStack() as stack:
        os.environ["DATABASE_URL"], os.environ["REDIS_URL"] = srv.database_url, srv.redis_url
        from workers.core.settings import reset_settings_cache

        reset_settings_cache()
        databases = {}
        for n in configs:
            # One database per rule count, made from the migrated scratch one's server.
            name = f"bench_alerts_{n}_{os.getpid()}"
            with psycopg.connect(srv.admin_dsn, autocommit=True) as admin:
                admin.execute(
                    f"CREATE DATABASE {name} TEMPLATE {srv.database_url.rsplit('/', 1)[1]}"
                )
            databases[n] = srv.database_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            calls = {}
            for n, dsn in databases.items():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(
                        "INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'Bench')", (PLAYLIST,)
                    )
                    add_rules(conn, n, seed=n)
                    calls[n] = add_calls(conn, args.transcripts)
                    conn.execute("ANALYZE")
            with psycopg.connect(srv.database_url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'Bench')", (PLAYLIST,)
                )
                for i in range(100):
                    (rule_id,) = conn.execute(
                        "INSERT INTO alert_rules (name, query) VALUES (%s, %s) RETURNING id",
                        (f"unit-{i}", f"tango{i}"),
                    ).fetchone()  # type: ignore[misc]
                live_calls = add_calls(conn, args.seconds * args.rounds)
            receiver = Receiver()
            with psycopg.connect(srv.database_url, autocommit=True) as conn:
                for i, (rule_id,) in enumerate(
                    conn.execute("SELECT id FROM alert_rules ORDER BY id").fetchall()
                ):
                    port = receiver.server.port
                    url = (
                        f"http://127.0.0.1:{port}/hook/{i}"
                        if i % 2
                        else f"json://127.0.0.1:{port}/apprise/{i}"
                    )
                    conn.execute(
                        "INSERT INTO alert_targets (rule_id, url, shown) VALUES (%s, %s, 'x')",
                        (rule_id, url),
                    )
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-alerts")))
            env = srv.worker_env(logdir)
            worker = start_worker("notify", "notify", env, logdir)
            try:
                for r in range(args.rounds):
                    for n in rotated(configs, r):
                        matching[n].append(asyncio.run(time_matching(databases[n], calls[n], r)))
                        print(f"round {r + 1}: {n} rules: {matching[n][-1]}", flush=True)
                    chunk = live_calls[r * args.seconds : (r + 1) * args.seconds]
                    delays, bare = latency_round(srv.database_url, receiver, chunk, args.seconds)
                    delivery.append((statistics.median(delays), p95(delays), p95(bare)))
                    print(f"round {r + 1}: delivery {delivery[-1]}", flush=True)
            finally:
                worker.stop()
                receiver.stop()
                from workers.core.runtime import Runtime

                Runtime.shutdown_current()
        finally:
            with psycopg.connect(srv.admin_dsn, autocommit=True) as admin:
                for dsn in databases.values():
                    admin.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")

    at_1000 = statistics.median(m for _, m, _ in matching[1000])
    p95_median = statistics.median(d[1] for d in delivery)
    lines = [
        heading(
            "alerts",
            f"{args.rounds} rounds interleaved; matching {args.transcripts} transcripts per "
            f"configuration; delivery {args.seconds} s at 1 call/s: median (min\u2013max)",
        ),
        "matching, ms per transcript (the transcript's INSERT in the same transaction is the "
        "baseline; matches: median deliveries made per transcript)",
        f"{'rules':>6} {'match_transcript':>22} {'INSERT transcript':>22} {'x INSERT':>9}"
        f" {'matches':>8}",
    ]
    for n in configs:
        match_ms = statistics.median(m for _, m, _ in matching[n])
        insert_ms = statistics.median(i for i, _, _ in matching[n])
        lines.append(
            f"{n:6} {spread((m for _, m, _ in matching[n]), '.3f'):>22}"
            f" {spread((i for i, _, _ in matching[n]), '.3f'):>22} {match_ms / insert_ms:9.2f}"
            f" {statistics.median(d for _, _, d in matching[n]):8.1f}"
        )
    lines += [
        f"goal: under 5 ms per transcript with 1,000 rules -> "
        f"{'met' if at_1000 < 5 else 'NOT met'} ({at_1000:.2f} ms)",
        "",
        "delivery at 1 call/s, 100 rules, two matches per call (webhook and Apprise json://),"
        " seconds from transcript stored to received",
        f"  p50 {spread((d[0] for d in delivery), '.3f')}",
        f"  p95 {spread((d[1] for d in delivery), '.3f')}",
        "  baseline, a bare POST to the same receiver, p95 "
        + spread((d[2] for d in delivery), ".4f"),
        f"goal: p95 at most 1 s -> {'met' if p95_median <= 1 else 'NOT met'} ({p95_median:.3f} s)",
    ]
    report("alerts", lines)


if __name__ == "__main__":
    run_bench(main)
