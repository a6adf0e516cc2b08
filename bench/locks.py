"""The singleton lock's cost per run, against a bare Redis round trip measured in the same run.

    python bench/locks.py [--runs 3000] [--rounds 5] [--redis-url redis://127.0.0.1:6379/14]

Prints, and writes to bench/results/locks.txt:
  * Redis round trips per run (counted at the connection) for a run that takes and releases the
    lock, for a beat tick (which also records its slot), and for a skipped run;
  * microseconds of each, next to a bare PING, and their ratio (of the medians). ROUNDS
    rounds, each timing every case (in an order that rotates from round to round, so drift on
    a shared machine hits them all alike); a round's figure is the median over chunks of 100
    calls, and the report shows median (min\u2013max) over the rounds.
Goal: at most 3 round trips per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, report, rotated, run_bench, spread
from workers.core.locks import SingletonLock
from workers.dev.services import redis_server


class CountingConnection(redis.Connection):
    """Counts requests written to the socket: one per round trip (no pipelining here)."""

    sent = 0

    def send_packed_command(self, command: bytes | list[bytes], check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def timed(fn, runs: int, chunk: int = 100) -> tuple[float, float]:
    """(median microseconds per call over chunks, round trips per call)."""
    CountingConnection.sent = 0
    medians = []
    for _ in range(runs // chunk):
        t0 = time.perf_counter()
        for _ in range(chunk):
            fn()
        medians.append((time.perf_counter() - t0) / chunk * 1e6)
    return statistics.median(medians), CountingConnection.sent / (runs // chunk * chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = ap.parse_args()
    with redis_server(args.redis_url) as url:
        rows = measure(url, args.runs, args.rounds)

    ping = statistics.median(r["ping"][0] for r in rows)
    lines = [
        heading(
            "locks",
            f"runs={args.runs} x {args.rounds} rounds interleaved: median (min\u2013max)",
        ),
        f"{'case':30} {'round trips':>11} {'us':>24} {'x ping':>7}",
    ]
    for case in rows[0]:
        us = statistics.median(r[case][0] for r in rows)
        trips = statistics.median(r[case][1] for r in rows)
        lines.append(
            f"{case:30} {trips:11.2f} {spread((r[case][0] for r in rows), '.1f'):>24}"
            f" {us / ping:7.2f}"
        )
    worst = max(statistics.median(r[c][1] for r in rows) for c in rows[0] if c != "ping")
    lines.append(
        f"goal: at most 3 round trips per run -> {'met' if worst <= 3 else 'NOT met'}"
        f" (worst case {worst:.2f})"
    )
    report("locks", lines)


def measure(url: str, runs: int, rounds: int) -> list[dict[str, tuple[float, float]]]:
    """Interleaved rounds of every case, one row per round: {case: (median us, round trips)}."""
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        client.ping()  # connect, and load the scripts once, outside the measurement
        SingletonLock(client, "bench.warm").acquire()
        slot = iter(range(10**9))

        def run_once() -> None:
            # What a worker does per run: acquire, start the renewal thread, release.
            lk = SingletonLock(client, "bench.job")
            assert lk.acquire()
            lk.start_renewing()
            lk.release(allow_run_again=True)

        def tick_once() -> None:
            lk = SingletonLock(client, "bench.tick")
            # A fresh tick: its lateness is checked against Redis's clock in the same script.
            sent_ms = int(time.time() * 1000)
            assert lk.acquire(
                tick_slot=next(slot), tick_ttl=60, tick_sent_ms=sent_ms, tick_grace=30
            )
            lk.release()

        holder = SingletonLock(client, "bench.held")
        holder.acquire()

        def skipped_once() -> None:
            assert not SingletonLock(client, "bench.held").acquire(trigger=True)

        cases = {
            "ping": client.ping,
            "run (acquire+release)": run_once,
            "beat tick (acquire+release)": tick_once,
            "skipped run": skipped_once,
        }
        rows = []
        for round_no in range(rounds):  # interleaved, so drift hits every case alike
            row = {name: timed(fn, runs) for name, fn in rotated(list(cases.items()), round_no)}
            rows.append({name: row[name] for name in cases})  # the report's order
        holder.release()
    finally:
        client.delete(*[k for k in client.scan_iter("bcfy:job:{bench.*")] or ["-"])
        client.close()
    return rows


if __name__ == "__main__":
    run_bench(main)
