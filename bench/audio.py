"""The audio stage's throughput with real worker processes, against a baseline in the same run.

    python bench/audio.py [--calls 200] [--latency 0.2] [--rounds 5]

Publishes CALLS calls on the feed simulator, whose audio answers each come LATENCY late,
stores them as ingest does, sends the
claim job one trigger (as ingest does; no beat), and times until every call is ready:
downloaded, validated, converted, stored. Rounds are the outer loop: each round runs every
configuration once, in an order that rotates from round to round, so drift on a shared machine
hits them all alike. A configuration's workers are started for its turn, outside the timing,
warmed with a few calls, and stopped after it (idle workers of the other configurations would
take work from the same queue). Each figure is the median over ROUNDS, its range beside it:

  * one worker of one pool process, AUDIO_DOWNLOAD_CONCURRENCY=1     (the baseline)
  * one worker of one pool process, the default concurrency
  * two workers of one pool process each, the default concurrency
  * the shipped pool (AUDIO_CONCURRENCY=2 processes) as one worker, and as two workers

Also: worker CPU seconds per call (all processes of the workers, from /proc), and CPU seconds
per minute of audio for validation plus conversion alone (in this process).

Then the memory one call's preparation takes (validate + convert, each in a fresh process):
the RSS high-water mark it adds and the Python heap peak (tracemalloc), for a served clip (a
normal call), ten minutes of silence as FLAC (114 KB that decodes to 19 MB) and a file just past
AUDIO_MAX_DURATION_SEC, as medians over ROUNDS (the cases interleaved round by round) with
their range and their ratio to the normal call. They go to
bench/results/audio_memory.txt. `--memory-only` runs just these; `--code DIR` measures the
preparation of another checkout (e.g. one from before decoding streamed), for comparison.

Goals, on the medians of the same run: default concurrency >= 0.8 x the concurrency over the
baseline; two workers >= 1.6 x one. Each ratio is also shown per round (the configurations of
one round ran minutes apart), as its range.
This machine has two cores, which the server, PostgreSQL and Redis share with the workers: two
workers can show that the claim and fan-out do not serialise work that waits on the network;
they cannot show more CPU than two cores give.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import psycopg
from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, report, rotated, run_bench, servers, spread, start_worker
from workers.audio.prepare import validate_and_convert
from workers.core.rows import one_row
from workers.core.settings import load_settings
from workers.dev.calls import CLIPS, make_flac, publish, slow_audio
from workers.dev.procs import Proc, group_cpu_sec, wait_until
from workers.dev.services import Servers
from workers.dev.simulator import FeedSimulator

CLAIM_JOB = "tasks.audio.process_pending_audio"
DEFAULT_CONCURRENCY = load_settings({}).audio.download_concurrency
MAX_DURATION = load_settings({}).audio.max_duration_sec
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    name: str
    workers: int
    processes: int
    concurrency: int


def one_round(
    db: psycopg.Connection, client: Celery, sim: FeedSimulator, calls: int, procs: list[Proc]
) -> tuple[float, float]:
    """(seconds from trigger to the last call ready, worker CPU seconds meanwhile)."""
    db.execute("TRUNCATE bcfy_calls_raw CASCADE")
    playlist = sim.add_playlist()
    for _ in range(calls):
        publish(sim, db, playlist)
    cpu0 = sum(group_cpu_sec(p.pid) for p in procs)
    t0 = time.perf_counter()
    trigger(client)
    ready = "SELECT count(*) FROM call_audio WHERE state = 'ready'"
    wait_until(
        lambda: one_row(db.execute(ready).fetchone())[0] == calls,
        600,
        "every call ready",
        every=0.02,
    )
    elapsed = time.perf_counter() - t0
    cpu = sum(group_cpu_sec(p.pid) for p in procs) - cpu0
    (bad,) = one_row(
        db.execute("SELECT count(*) FROM call_audio_attempts WHERE outcome <> 'ready'").fetchone()
    )
    assert bad == 0, "a call failed during the bench"
    return elapsed, cpu


def celery_client(redis_url: str) -> Celery:
    """A client that sends tasks by name to the broker at redis_url (its password and TLS
    settings included), as the stages do."""
    client = Celery(broker=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    return client


def trigger(client: Celery) -> None:
    """What ingest does after storing new calls: send the claim job by name."""
    client.send_task(CLAIM_JOB, queue="audio")


@dataclass(frozen=True)
class Bench:
    """What every turn of an audio bench runs on: servers, broker client, simulator, database,
    a scratch directory and where the workers' logs go."""

    services: Servers
    client: Celery
    sim: FeedSimulator
    db: psycopg.Connection
    tmp: Path
    logdir: Path

    def turn(
        self, name: str, calls: int, workers: int, processes: int, **store: str
    ) -> tuple[float, float]:
        """Start `workers` audio workers of `processes` each with the settings `store` (where the
        audio goes, download concurrency), warm them up untimed, time `calls` calls through
        them (one_round), and stop them."""
        env = self.services.worker_env(
            self.tmp,
            AUDIO_ALLOWED_HOSTS=self.sim.audio_host,
            AUDIO_ALLOWED_INTERNAL_NETWORKS="127.0.0.1/32",
            AUDIO_POOL="prefork",
            AUDIO_CONCURRENCY=str(processes),
            LOG_LEVEL="INFO",  # the worker says "ready." at INFO
            **store,
        )
        procs: list[Proc] = []
        try:
            for i in range(workers):
                procs.append(start_worker("audio", f"{name}{i}", env, self.logdir))
            # Warm-up, untimed: connections, imports in the pool processes.
            one_round(self.db, self.client, self.sim, 2 * workers * processes, procs)
            return one_round(self.db, self.client, self.sim, calls, procs)
        finally:
            for p in procs:
                p.stop(timeout=10)


@contextlib.contextmanager
def audio_bench(latency: float, logs: str | None) -> Iterator[Bench]:
    """The servers, simulator (audio answered `latency` s late) and scratch directory of an
    audio bench's run; the workers' logs go to `logs` (kept) or the scratch directory."""
    with (
        servers() as services,
        celery_client(services.redis_url) as client,
        FeedSimulator(seed=1) as sim,
        TemporaryDirectory() as tmp,
        services.db() as db,
    ):
        slow_audio(sim, latency)
        logdir = Path(logs or tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        yield Bench(services, client, sim, db, Path(tmp), logdir)


def conversion_cpu_per_audio_minute(repeats: int = 5) -> float:
    """CPU seconds to validate and convert one minute of served audio (decode + FLAC)."""
    with TemporaryDirectory() as tmp:
        audio = 0.0
        t0 = time.process_time()
        for _ in range(repeats):
            for clip in CLIPS:
                original = Path(tmp) / "in.m4a"
                original.write_bytes(clip.data)
                validate_and_convert(
                    original,
                    Path(tmp) / "out.flac",
                    expected_duration=clip.duration,
                    tolerance=0.15,
                    silence_dbfs=-50,
                    max_duration_sec=MAX_DURATION,
                )
                audio += clip.duration
        return (time.process_time() - t0) / (audio / 60)


# Run in a fresh interpreter whose sys.path starts at the checkout measured: prepare one file,
# print (RSS high-water mark and how much the call added to it, KiB; tracemalloc peak, bytes;
# outcome) as JSON.
MEMORY_CHILD = """
import inspect, json, resource, sys, tracemalloc
from pathlib import Path
from workers.audio.download import AudioFailure
from workers.audio.prepare import validate_and_convert
original, out, limit, traced = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
kwargs = dict(expected_duration=None, tolerance=0.15, silence_dbfs=-50.0)
if "max_duration_sec" in inspect.signature(validate_and_convert).parameters:
    kwargs["max_duration_sec"] = limit
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if traced == "1":
    tracemalloc.start()
try:
    validate_and_convert(original, out, **kwargs)
    outcome = "ready"
except AudioFailure as failure:
    outcome = failure.code
peak = tracemalloc.get_traced_memory()[1] if traced == "1" else 0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([after, after - before, peak, outcome]))
"""


def prepare_memory(
    code: Path, original: Path, out: Path, limit: float
) -> tuple[int, int, int, str]:
    """(RSS high-water mark, and how much the call added to it; tracemalloc peak; outcome) of
    preparing one file in a fresh process, in bytes (two runs: tracing costs memory of its
    own)."""

    def run(traced: str) -> list:
        argv = [sys.executable, "-c", MEMORY_CHILD, str(original), str(out), str(limit), traced]
        env = {**os.environ, "PYTHONPATH": str(code)}
        done = subprocess.run(argv, cwd=code, env=env, capture_output=True, text=True, check=True)
        out.unlink(missing_ok=True)
        printed: list = json.loads(done.stdout.strip().splitlines()[-1])
        return printed

    rss_kib, added_kib, _, outcome = run("0")
    peak = run("1")[2]
    return rss_kib * 1024, added_kib * 1024, peak, outcome


def memory_report(code: Path, rounds: int) -> list[str]:
    """Memory per call: a served clip, ten minutes of silence, a file just past the limit."""
    limit = MAX_DURATION
    with TemporaryDirectory() as tmp:
        normal = Path(tmp) / CLIPS[0].file
        normal.write_bytes(CLIPS[0].data)
        cases = [
            (f"served clip ({CLIPS[0].duration:.1f} s, normal call)", normal),
            ("10 min of silence, FLAC", make_flac(Path(tmp) / "ten.flac", 600)),
            (
                f"{limit + 1:g} s of silence, FLAC (past the limit)",
                make_flac(Path(tmp) / "past.flac", limit + 1),
            ),
        ]
        runs: dict[str, list[tuple[int, int, int, str]]] = {name: [] for name, _ in cases}
        for round_no in range(rounds):  # interleaved: drift hits every case alike
            for name, path in rotated(cases, round_no):
                runs[name].append(prepare_memory(code, path, Path(tmp) / "out.flac", limit))
            print(f"memory round {round_no + 1}/{rounds} done", flush=True)
        sizes = {name: path.stat().st_size for name, path in cases}
    base = runs[cases[0][0]]
    base_rss = statistics.median(r[0] for r in base)
    base_peak = statistics.median(r[2] for r in base)
    lines = [
        heading(
            "audio",
            f"memory per call  code={'this checkout' if code == ROOT else code}"
            f"  AUDIO_MAX_DURATION_SEC={limit:g}  rounds={rounds} interleaved:"
            " median (min\u2013max)",
        ),
        f"{'file':42} {'bytes':>9} {'outcome':>9} {'RSS MB':>19} {'x normal':>8}"
        f" {'added MB':>15} {'heap MB':>19} {'x normal':>8}",
    ]
    for name, rs in runs.items():
        rss = statistics.median(r[0] for r in rs)
        peak = statistics.median(r[2] for r in rs)
        outcomes = sorted({r[3] for r in rs})
        lines.append(
            f"{name:42} {sizes[name]:9d} {'/'.join(outcomes):>9}"
            f" {spread(r[0] / 1e6 for r in rs):>19} {rss / base_rss:8.2f}"
            f" {spread(r[1] / 1e6 for r in rs):>15} {spread((r[2] / 1e6 for r in rs), '.2f'):>19}"
            f" {peak / max(base_peak, 1):8.2f}"
        )
    lines.append(
        "RSS: the process's high-water mark (imports included), added: by the call itself; "
        "heap: tracemalloc's peak (numpy and Python objects; FFmpeg's buffers are only in RSS)"
    )
    return lines


def audio_bench_arguments() -> argparse.ArgumentParser:
    """The options every audio bench takes: calls per turn, the audio's latency, rounds, and
    where to keep the workers' logs."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--logs", help="keep the workers' logs in this directory")
    return ap


def main() -> None:
    ap = audio_bench_arguments()
    ap.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="instead of the default"
    )
    ap.add_argument("--memory-only", action="store_true", help="just the memory per call")
    ap.add_argument("--no-memory", action="store_true", help="just the throughput")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose preparation to weigh")
    args = ap.parse_args()

    if not args.no_memory:
        memory = memory_report(args.code.resolve(), args.rounds)
        report("audio_memory", memory, keep=args.code.resolve() == ROOT)
    if args.memory_only:
        return

    d = args.concurrency
    configs = [
        Config("1 worker x 1 process, concurrency 1", 1, 1, 1),
        Config(f"1 worker x 1 process, concurrency {d}", 1, 1, d),
        Config(f"2 workers x 1 process, concurrency {d}", 2, 1, d),
        Config(f"1 worker x 2 processes, concurrency {d}", 1, 2, d),
        Config(f"2 workers x 2 processes, concurrency {d}", 2, 2, d),
    ]
    # Per configuration, per round: (seconds to the last call ready, worker CPU seconds).
    runs: dict[str, list[tuple[float, float]]] = {c.name: [] for c in configs}
    with audio_bench(args.latency, args.logs) as bench:
        for round_no in range(args.rounds):
            for config in rotated(configs, round_no):
                elapsed, cpu = bench.turn(
                    "bench",
                    args.calls,
                    config.workers,
                    config.processes,
                    AUDIO_STORE_DIR=f"{bench.tmp}/store",
                    AUDIO_DOWNLOAD_CONCURRENCY=str(config.concurrency),
                )
                runs[config.name].append((elapsed, cpu))
                print(
                    f"round {round_no + 1}/{args.rounds}  {config.name:42}"
                    f" {args.calls / elapsed:7.1f} calls/s",
                    flush=True,
                )

    per_minute = conversion_cpu_per_audio_minute()
    rates = {name: [args.calls / e for e, _ in rs] for name, rs in runs.items()}
    rate = {name: statistics.median(r) for name, r in rates.items()}
    base_name, one_name, two_name, pool_one_name, pool_two_name = (c.name for c in configs)

    def ratio(a: str, b: str) -> str:
        """The ratio of the medians; then the same ratio round by round (the configurations of
        one round ran minutes apart, those of different rounds maybe further)."""
        per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        return f"{rate[a] / rate[b]:.2f} x; per round {spread(per_round, '.2f')}"

    one_x, two_x = rate[one_name] / rate[base_name], rate[two_name] / rate[one_name]
    lines = [
        heading(
            "audio",
            f"calls={args.calls}  latency={args.latency * 1000:.0f} ms  rounds={args.rounds}"
            f" interleaved, rotating order: median (min\u2013max)  cpus={os.cpu_count()}",
        ),
        f"{'configuration':42} {'calls/s':>19} {'x base':>7} {'cpu ms/call':>19}",
    ]
    for name, rs in runs.items():
        cpu_ms = spread(cpu / args.calls * 1000 for _, cpu in rs)
        lines.append(
            f"{name:42} {spread(rates[name]):>19} {rate[name] / rate[base_name]:7.2f} {cpu_ms:>19}"
        )
    lines += [
        f"validation + conversion: {per_minute:.3f} CPU s per minute of audio",
        f"goal: concurrency {d} >= {0.8 * d:.1f} x concurrency 1 -> "
        f"{'met' if one_x >= 0.8 * d else 'NOT met'} ({ratio(one_name, base_name)})",
        f"goal: two workers >= 1.6 x one (1 process each) -> "
        f"{'met' if two_x >= 1.6 else 'NOT met'} ({ratio(two_name, one_name)})",
        "shipped pool (2 processes per worker): two workers over one"
        f" {ratio(pool_two_name, pool_one_name)}",
    ]
    report("audio", lines, keep=d == DEFAULT_CONCURRENCY)  # the committed figures: defaults
    print(json.dumps({k: round(v, 2) for k, v in rate.items()}))


if __name__ == "__main__":
    run_bench(main)
