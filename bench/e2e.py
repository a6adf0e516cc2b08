"""The whole pipeline end to end: sustained calls per second, call-to-transcript latency, and the
stage that saturates first, at given arrival rates.

    python bench/e2e.py [--rates 0.3,1,2,3] [--duration 120] [--repeat 1] [--playlists 4]
                        [--logs DIR] [--set NAME=VALUE ...] [--no-save]

For each arrival rate (calls per second over all playlists, Poisson, on the real clock): a
fresh pipeline (workers/dev/pipeline.py: the feed simulator over real HTTP, `bcfy playlists
add`, beat and the three pools with the command lines and settings of `bcfy beat|worker`, the
default recogniser), a warm-up call per playlist, DURATION seconds of traffic, then the drain.
Every second meanwhile it samples each stage's backlog: calls published but not stored (poll),
stored but not prepared (audio), prepared but not sent to the pool (dispatch), sent but not
transcribed (transcription). Reported per rate, over the traffic after its first 20 s:

  * sustained: transcripts per second, and its ratio to the arrivals (1.00: keeping up). Counts
    rise in steps, one per poll; rates are least-squares slopes over means of whole poll
    intervals, which do not depend on where the steps fall;
  * latency from each call's publication to its transcript, p50 / p95: with the call's own
    recognition excluded ("excl", the goal's measure) and included, and with waiting for a
    free recogniser excluded too ("pipeline": polling, audio, dispatch, storing); where the
    time went, step by step;
  * per stage: mean backlog, its growth (calls/s, with its standard error) and what was left
    when the traffic stopped. The first stage, in pipeline order, whose backlog grows by at
    least 10 % of the arrival rate (and three standard errors, and half a poll's worth of calls
    over the window) is named as the one that saturates first;
  * CPU: seconds per call of each pool, cores busy (the machine's, and ours), and the capacity
    that our CPU per call allows on this machine's cores.

Repeats: with --repeat N, N rounds each run every rate once, lowest first in the first round
and in an order that rotates from round to round after it (so drift on a shared machine, and
running right after the heaviest rate, hit every rate alike); the per-round tables have a row
per rate and round, and a summary gives each headline figure as median (min\u2013max) over the
rounds; the goal is judged on the median. One round of the default rates takes some 12 minutes
on this machine, which is why the default is a single round (its summary shows no spread): the
figures the goal rests on want --repeat 5 (an hour).

Baselines in the same run: the lowest rate of the same round (p95 ratios against it), and a
perfect poller: the
wait from publication to a poll exactly every INGEST_INTERVAL_SEC that sees the call (it shows
from its next whole second), the part of the latency that no implementation polling at that
interval avoids. Goal: p95 with recognition excluded within INGEST_INTERVAL_SEC + 2 s.

The machine has two cores, shared by the pools, PostgreSQL, Redis, the simulator, this script
and whatever else runs: the saturation point found is this machine's at that moment (the load
is printed), and recognition, CPU bound, is where it shows first. At a rate past saturation the
latency grows with the length of the run: its figures hold for this duration only. The figures
of a run with the default settings are written to bench/results/e2e.txt.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beat_schedule import QUEUES
from bench._common import heading, report, rotated, run_bench, servers, spread
from workers.core.settings import Settings, SettingsError, load_settings
from workers.dev.pipeline import (
    STAGES,
    Latency,
    Pipeline,
    Sample,
    machine_cpu,
    percentile,
    period_means,
    slope_fit,
)
from workers.dev.procs import group_cpu_sec

# The pipeline's settings: the defaults, plus any --set NAME=VALUE.
SETTINGS: dict[str, str] = {}


def settings() -> Settings:
    return load_settings(SETTINGS)


WARMUP_SEC = 20.0  # the start of the traffic window left out of the steady-state figures
GROWING = 0.10  # a backlog growing by more than this fraction of the arrival rate


@dataclass
class RateResult:
    rate: float  # asked for
    round: int  # of --repeat, from 1
    published: int  # in the traffic
    duration: float
    arrivals: float  # published per second, steady window
    sustained: float  # transcripts per second, steady window
    drain_sec: float
    latency: Latency
    growth: dict[str, tuple[float, float]]  # stage -> backlog growth, calls/s, and its error
    mean_backlog: dict[str, float]
    end_backlog: dict[str, int]  # when the traffic stopped
    saturated: str | None
    cpu_per_call: dict[str, float]  # pool -> CPU s per call
    machine_busy: float  # cores busy, on average, during the traffic
    ours_busy: float  # of which the pools and this process (the simulator)
    queue_max: int  # most messages waiting in the transcription queue
    failed: int
    exactly_once: list[str]  # violations


def poll_wait_model(interval: float, n: int = 200_000, seed: int = 7) -> tuple[float, float]:
    """(p50, p95) of the wait from publication to the poll that first sees the call, for polls
    exactly every `interval` s at a random phase; a call shows from its next whole second."""
    rng = random.Random(seed)
    waits = []
    for _ in range(n):
        phase = rng.uniform(0, interval)
        published = rng.uniform(1000, 2000)
        visible = math.floor(published) + 1
        poll = phase + math.ceil((visible - phase) / interval) * interval
        waits.append(poll - published)
    return percentile(waits, 50), percentile(waits, 95)


def saturated_stage(
    growth: dict[str, tuple[float, float]], rate: float, window: float, interval: float
) -> str | None:
    """The first stage, in pipeline order, whose backlog grows without bound: by at least
    GROWING of the arrival rate and three standard errors of its estimate (Poisson arrivals
    make a stage that keeps up fluctuate), and by more over the window than half a poll's
    worth of calls."""
    for stage in STAGES:
        g, se = growth[stage]
        if g >= max(GROWING * rate, 3 * se) and g * window >= max(3.0, 0.5 * rate * interval):
            return stage
    return None


def analyse(
    p: Pipeline,
    rate: float,
    duration: float,
    t_start: float,
    drain_sec: float,
    cpu: dict[str, float],
    busy: tuple[float, float],
) -> RateResult:
    interval = settings().jobs.ingest_interval_sec
    samples: list[Sample] = p.sampler.samples if p.sampler else []
    t_end = t_start + duration
    a = t_start + WARMUP_SEC

    def fit(value: Callable[[Sample], float]) -> tuple[float, float]:
        return slope_fit(period_means(samples, a, t_end, interval, value))

    growth = {stage: fit(partial(Sample.backlog, stage=stage)) for stage in STAGES}
    window = [s for s in samples if a <= s.t <= t_end]
    mean = {stage: statistics.fmean(s.backlog(stage) for s in window) for stage in STAGES}
    at_end = min(samples, key=lambda s: abs(s.t - t_end))
    saturated = saturated_stage(growth, rate, t_end - a, interval)
    queue_max = settings().transcription.queue_max
    if saturated == "dispatch" and max(s.in_pool for s in window) >= queue_max:
        # The dispatcher holds calls back while the queue is full: the pool is what is slow.
        saturated = "transcription (held back in PostgreSQL at TRANSCRIBE_QUEUE_MAX)"
    calls = p.calls()
    traffic_urls = {u for u in p.published if u not in p.warmup}
    latency = Latency.of([c for c in calls if c.url in traffic_urls], p.published)
    stats = p.sim.stats(per_call=True)
    violations = []
    served_twice = [u for u, n in stats["served"].items() if n != 1]
    if served_twice:
        violations.append(f"{len(served_twice)} calls served other than once")
    urls = [c.url for c in calls]
    if len(urls) != len(set(urls)) or set(urls) != set(p.published):
        violations.append("stored calls differ from the published ones")
    if stats["billed_records"] != len(calls):
        violations.append(f"billed {stats['billed_records']} records for {len(calls)} calls")
    bad = [c.id for c in calls if c.audio_ready_count > 1 or c.transcripts > 1]
    if bad:
        violations.append(f"calls prepared or transcribed twice: {bad[:10]}")
    errors = p.job_errors()
    if errors:
        violations.append(f"{len(errors)} job runs ended in error or lost their lock: {errors[:3]}")
    failed = sum(1 for c in calls if "failed" in (c.audio_state, c.transcription_state))
    return RateResult(
        rate=rate,
        round=0,  # set by the caller
        published=len(traffic_urls),
        duration=duration,
        arrivals=fit(lambda s: s.published)[0],
        sustained=fit(lambda s: s.transcribed)[0],
        drain_sec=drain_sec,
        latency=latency,
        growth=growth,
        mean_backlog=mean,
        end_backlog={stage: at_end.backlog(stage) for stage in STAGES},
        saturated=saturated,
        cpu_per_call={k: v / max(1, len(traffic_urls)) for k, v in cpu.items()},
        machine_busy=busy[0],
        ours_busy=busy[1],
        queue_max=max(s.queued["transcription"] for s in samples),
        failed=failed,
        exactly_once=violations,
    )


def run_rate(
    database_url: str,
    redis_url: str,
    workdir: Path,
    rate: float,
    duration: float,
    playlists: int,
    seed: int,
) -> RateResult:
    with Pipeline(database_url, redis_url, workdir, seed=seed, extra_env=SETTINGS) as p:
        p.empty()
        p.follow_playlists(playlists)
        p.start()
        p.wait_for_warmup(timeout=120)
        pools = {q: p.procs[f"worker-{q}"].pid for q in QUEUES}
        before = cpu_seconds(pools)
        t_start = time.time()
        p.run_traffic(rate, duration, seed=seed)
        during = cpu_seconds(pools)
        # Generous: a saturated pipeline drains its backlog at the pool's pace.
        drain = p.drain(timeout=120 + 3 * rate * duration)
        after = cpu_seconds(pools)
        p.quiesce(timeout=60)
        cores = os.cpu_count() or 1
        machine = (during["machine"] - before["machine"]) / (
            during["machine_total"] - before["machine_total"]
        )
        ours = sum(during[k] - before[k] for k in (*QUEUES, "bench")) / duration
        cpu = {k: after[k] - before[k] for k in (*QUEUES, "bench")}
        return analyse(p, rate, duration, t_start, drain, cpu, (machine * cores, ours))


def cpu_seconds(pools: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: each pool (its process group), this process, the whole machine."""
    out = {queue: group_cpu_sec(pid) for queue, pid in pools.items()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["bench"] = usage.ru_utime + usage.ru_stime
    out["machine"], out["machine_total"] = machine_cpu()
    return out


def report_lines(results: list[RateResult], args: argparse.Namespace) -> list[str]:
    s = settings()
    interval = s.jobs.ingest_interval_sec
    goal = interval + 2
    model50, model95 = poll_wait_model(interval)
    results = sorted(results, key=lambda r: (r.rate, r.round))
    rounds = max(r.round for r in results)
    # The baseline of each round: its lowest rate.
    base = {r.round: r.latency for r in sorted(results, key=lambda r: r.rate, reverse=True)}
    load = os.getloadavg()

    def p(values: list[float], q: float) -> float:
        return percentile(values, q)

    lines = [
        heading(
            "e2e",
            f"cpus={os.cpu_count()}  {args.duration:g} s of traffic per rate over"
            f" {args.playlists} playlists, seed {args.seed}; steady window: after the first"
            f" {WARMUP_SEC:g} s; {rounds} round(s), rates in rotating order;"
            f" load at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        ),
        f"# settings: {' '.join(f'{k}={v}' for k, v in SETTINGS.items()) or 'the defaults'}:"
        f" INGEST_INTERVAL_SEC {interval:g}, {s.transcription.backend}, pools: transcription"
        f" {s.pools.transcription_concurrency or os.cpu_count()} processes, audio"
        f" {s.pools.audio_concurrency}, ingest {s.pools.ingest_concurrency}",
        "# latency: publication -> transcript stored. excl: less the call's own recognition;"
        " pipeline: less waiting for a free recogniser too",
        "",
        f"{'asked/s':>7} {'rnd':>3} {'calls':>5} {'arrived/s':>9} {'sustained/s':>11} {'x arr':>5}"
        f" {'drain s':>7} {'excl p50':>8} {'excl p95':>8} {'incl p50':>8} {'incl p95':>8}"
        f" {'pipeline p95':>12} {'excl p95 x base':>15} {'cores busy':>10}  saturated first",
    ]
    for r in results:
        lat = r.latency
        lines.append(
            f"{r.rate:7.2f} {r.round:3d} {r.published:5d} {r.arrivals:9.2f} {r.sustained:11.2f}"
            f" {r.sustained / r.arrivals:5.2f} {r.drain_sec:7.1f}"
            f" {p(lat.excluded, 50):8.2f} {p(lat.excluded, 95):8.2f}"
            f" {p(lat.included, 50):8.2f} {p(lat.included, 95):8.2f} {p(lat.pipeline, 95):12.2f}"
            f" {p(lat.excluded, 95) / p(base[r.round].excluded, 95):15.2f} {r.machine_busy:10.2f}"
            f"  {r.saturated or 'none'}"
        )
    lines += [
        "",
        f"where the time went, median / p95 s (poll wait of a perfect poller every {interval:g} s:"
        f" {model50:.2f} / {model95:.2f})",
        f"{'asked/s':>7} {'rnd':>3} {'poll wait':>13} {'audio':>11} {'dispatch':>11} {'queue':>11}"
        f" {'recognise':>11} {'store':>11}  poll wait p95 x perfect",
    ]
    for r in results:
        lat = r.latency
        parts = [lat.poll, lat.audio, lat.dispatch, lat.queue, lat.recognition, lat.store]
        lines.append(
            f"{r.rate:7.2f} {r.round:3d} {p(parts[0], 50):6.2f} /{p(parts[0], 95):5.2f}"
            + "".join(f" {p(v, 50):5.2f} /{p(v, 95):4.1f}" for v in parts[1:])
            + f"  {p(lat.poll, 95) / model95:.2f}"
        )
    lines += [
        "",
        "stage backlogs (calls) over the steady window: mean, growth per s, left when the"
        " traffic stopped",
        f"{'asked/s':>7} {'rnd':>3} " + " ".join(f"{s:>22}" for s in STAGES),
    ]
    for r in results:
        lines.append(
            f"{r.rate:7.2f} {r.round:3d} "
            + " ".join(
                f"{r.mean_backlog[s]:6.1f} {r.growth[s][0]:+6.2f}±{r.growth[s][1]:4.2f}"
                f" {r.end_backlog[s]:5d}"
                for s in STAGES
            )
        )
    cores = os.cpu_count() or 1
    lines += [
        "",
        "CPU: seconds per call of each pool (process groups) and of 'bench' (this process: the"
        " simulator's server and the sampler); cores busy during the traffic, the machine's and"
        " ours (pools + bench; the rest is PostgreSQL, Redis and whatever else runs here);"
        f" capacity = {cores} cores / our CPU s per call (PostgreSQL and Redis not counted)",
    ]
    for r in results:
        per_call = sum(r.cpu_per_call.values())
        lines.append(
            f"{r.rate:7.2f} {r.round:3d}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in r.cpu_per_call.items())
            + f"  cores busy {r.machine_busy:.2f} (ours {r.ours_busy:.2f})"
            f"  capacity {cores / per_call:.2f}/s, sustained = {r.sustained * per_call / cores:.2f}"
            f" x capacity  (transcription queue: at most {r.queue_max} messages)"
        )
    by_rate: dict[float, list[RateResult]] = {}
    for r in results:
        by_rate.setdefault(r.rate, []).append(r)
    lines += [
        "",
        f"over {rounds} round(s), median (min\u2013max); excl p95 x base: against the lowest rate"
        " of the same round",
        f"{'asked/s':>7} {'sustained/s':>18} {'x arr':>18} {'excl p50':>20} {'excl p95':>20}"
        f" {'pipeline p95':>20} {'excl p95 x base':>18}",
    ]
    for rate, rs in by_rate.items():
        lines.append(
            f"{rate:7.2f} {spread((r.sustained for r in rs), '.2f'):>18}"
            f" {spread((r.sustained / r.arrivals for r in rs), '.2f'):>18}"
            f" {spread((p(r.latency.excluded, 50) for r in rs), '.2f'):>20}"
            f" {spread((p(r.latency.excluded, 95) for r in rs), '.2f'):>20}"
            f" {spread((p(r.latency.pipeline, 95) for r in rs), '.2f'):>20}"
            + " {:>18}".format(
                spread(
                    (p(r.latency.excluded, 95) / p(base[r.round].excluded, 95) for r in rs), ".2f"
                )
            )
        )
    lines.append("")
    for rate, rs in by_rate.items():
        excl95 = [p(r.latency.excluded, 95) for r in rs]
        verdict = "met" if statistics.median(excl95) <= goal else "NOT met"
        problems = [f"round {r.round}: {v}" for r in rs for v in r.exactly_once]
        checks = "; ".join(problems) or "every call stored, prepared, transcribed once"
        lines.append(
            f"at {rate:g}/s: goal p95 (recognition excluded) <= {goal:g} s -> {verdict}"
            f" ({spread(excl95, '.2f')} s; pipeline alone"
            f" {spread((p(r.latency.pipeline, 95) for r in rs), '.2f')} s); {checks};"
            f" {sum(r.failed for r in rs)} failed"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rates", default="0.3,1,2,3", help="arrival rates, calls/s, comma-separated")
    ap.add_argument("--duration", type=float, default=120, help="seconds of traffic per rate")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds, each running every rate (rotating order)"
    )
    ap.add_argument("--playlists", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--logs", help="keep the processes' logs under this directory")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the pipeline (e.g. INGEST_INTERVAL_SEC=6); repeatable",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/e2e.txt")
    args = ap.parse_args()
    rates = sorted(float(r) for r in args.rates.split(","))
    for item in args.set:
        name, _, value = item.partition("=")
        SETTINGS[name.strip()] = value.strip()
    try:
        interval = settings().jobs.ingest_interval_sec
    except SettingsError as exc:
        sys.exit(f"bench/e2e.py: {exc}")
    if args.duration < WARMUP_SEC + 3 * interval:
        sys.exit(
            f"bench/e2e.py: --duration must be at least {WARMUP_SEC + 3 * interval:g} s: the"
            f" first {WARMUP_SEC:g} s and three poll intervals to measure rates over"
        )
    save = not args.no_save and not SETTINGS  # the committed figures are the defaults

    results: list[RateResult] = []
    with servers() as run, tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.repeat):
            for rate in rotated(rates, round_no):
                workdir = Path(args.logs or tmp) / f"round-{round_no + 1}" / f"rate-{rate:g}"
                print(
                    f"round {round_no + 1}/{args.repeat}, rate {rate:g}/s:"
                    f" {args.duration:g} s of traffic ...",
                    flush=True,
                )
                result = run_rate(
                    run.database_url,
                    run.redis_url,
                    workdir,
                    rate,
                    args.duration,
                    args.playlists,
                    args.seed,
                )
                result.round = round_no + 1
                results.append(result)
                lat = result.latency
                print(
                    f"  sustained {result.sustained:.2f}/s, latency excl p50"
                    f" {percentile(lat.excluded, 50):.2f} p95 {percentile(lat.excluded, 95):.2f},"
                    f" saturated: {result.saturated or 'none'}",
                    flush=True,
                )
    report("e2e", report_lines(results, args), keep=save)


if __name__ == "__main__":
    run_bench(main)
