"""The feed simulator's cost of a live page of 1,000 calls, so the ingest benchmark measures
the pipeline and not its fake service.

    python bench/simulator.py [--rounds 30] [--page 1000]

Prints, and writes to bench/results/simulator.txt, milliseconds as median (min\u2013max) over
ROUNDS rounds, each of which times every case once (in an order that rotates from round to
round, so drift on a shared machine hits them all alike):
  * serialising the page in the simulator (records pre-serialised at publication, joined);
  * the same page with json.dumps of the record dicts (what a naive server would do): baseline;
  * a full round trip over HTTP with httpx (request, token check, answer, parse with json);
  * json.loads of the page alone (the client's share of the round trip);
  * round trips of a small API answer (the countries list) and of one call's audio clip, the
    server's own cost per request (HTTP parsing, dispatch, token check);
  * 200 small answers asked by 8 threads at once, per request: the server under concurrency.
Every case is timed once per round, the cases in rotating order.
Goal, on the medians: the page serialises in a few milliseconds (at most 5 ms) and costs the
simulator no more than the naive json.dumps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, interleaved_ms, report, run_bench, spread
from workers.dev.simulator import DEMO_API_KEYS, FeedSimulator, ManualClock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--page", type=int, default=1000)
    args = ap.parse_args()
    clock = ManualClock(1_700_000_000)
    with FeedSimulator(clock=clock, seed=1) as sim:
        sim.faults.min_poll_interval = 0  # the bench polls back to back
        uuid = sim.add_playlist(name="Bench")
        for _ in range(args.page):
            sim.publish_call(uuid)
        clock.advance(2)
        feed = sim._feed
        records = sim.calls(uuid)
        pos = records[0]["ts"] - 1

        def in_simulator() -> None:
            body, n = feed.live(
                ("playlist_uuid", uuid), pos=pos, init=False, poller="b", as_user=False
            )
            assert n == args.page and body

        def naive() -> None:
            now = clock()
            json.dumps({"serverTime": int(now), "lastPos": int(now) - 1, "calls": records})

        kid, (secret, app_id) = next(iter(DEMO_API_KEYS.items()))
        now = int(clock())
        bearer = jwt.encode(
            {"iss": app_id, "iat": now, "exp": now + 3600}, secret, headers={"kid": kid}
        )
        http = httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {bearer}"})
        page_bytes = http.get("/calls/v1/live/", params={"playlist_uuid": uuid, "pos": pos}).content

        def over_http() -> None:
            r = http.get("/calls/v1/live/", params={"playlist_uuid": uuid, "pos": pos})
            assert len(r.json()["calls"]) == args.page

        def parse_only() -> None:
            json.loads(page_bytes)

        def small_answer() -> None:
            r = http.get("/common/v1/countries")
            assert r.status_code == 200 and r.json()["countries"]

        clip_url = sim.publish_call(uuid)["url"]

        def audio_clip() -> None:
            r = http.get(clip_url)
            assert r.status_code == 200 and r.content

        clients = [
            httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {bearer}"})
            for _ in range(8)
        ]
        pool = ThreadPoolExecutor(len(clients))

        def concurrent_per_request() -> None:
            def twenty_five(client: httpx.Client) -> None:
                for _ in range(25):
                    assert client.get("/common/v1/countries").status_code == 200

            list(pool.map(twenty_five, clients))

        figures = interleaved_ms(
            {
                "simulator: serialise the page": in_simulator,
                "baseline: json.dumps the page": naive,
                "HTTP round trip (httpx, parsed)": over_http,
                "json.loads of the page alone": parse_only,
                "HTTP round trip, small answer": small_answer,
                "HTTP round trip, audio clip": audio_clip,
                "8 clients at once, per request": concurrent_per_request,
            },
            args.rounds,
        )
        per_request = 25 * len(clients)
        figures["8 clients at once, per request"] = [
            ms / per_request for ms in figures["8 clients at once, per request"]
        ]
        http.close()
        pool.shutdown()
        for client in clients:
            client.close()
    medians = {name: statistics.median(ms) for name, ms in figures.items()}
    serialise = medians["simulator: serialise the page"]
    baseline = medians["baseline: json.dumps the page"]
    lines = [
        heading(
            "simulator",
            f"page={args.page} rounds={args.rounds} interleaved: median (min\u2013max)"
            f"  page size {len(page_bytes) / 1024:.0f} KiB",
        ),
        f"{'case':<36}{'ms':>20}{'x baseline':>12}",
    ]
    for name, ms in figures.items():
        lines.append(f"{name:<36}{spread(ms, '.2f'):>20}{medians[name] / baseline:>12.2f}")
    met = serialise <= 5 and serialise <= baseline
    lines.append(
        f"goal: page serialised in <= 5 ms and no slower than json.dumps -> "
        f"{'met' if met else 'NOT met'} ({serialise:.2f} ms, {serialise / baseline:.2f}x)"
    )
    report("simulator", lines)


if __name__ == "__main__":
    run_bench(main)
