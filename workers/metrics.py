"""`bcfy metrics`: the pipeline's own Prometheus metrics on a scrape endpoint.

Flower serves Celery's task metrics on its own /metrics; this adds what only the pipeline
knows: each stage's backlog and totals, poll errors, quarantined records, lock skips, job run
outcomes, queue depths, workers online and call-to-transcript latency. Every scrape reads a
fresh `workers.status` snapshot (the same numbers as `bcfy status`), so the endpoint keeps no
state and any number of them can run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.settings import Settings
from workers.status import Snapshot, snapshot


class PipelineCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        started = time.monotonic()
        snap = snapshot(self.settings, totals=True)
        yield from families(snap)
        up = GaugeMetricFamily("bcfy_scrape_ok", "1 when every source answered this scrape")
        up.add_metric([], 0 if snap.problems else 1)
        yield up
        took = GaugeMetricFamily("bcfy_scrape_seconds", "Time taken to read the snapshot")
        took.add_metric([], time.monotonic() - started)
        yield took


def families(snap: Snapshot) -> Iterator[Any]:
    backlog = GaugeMetricFamily("bcfy_stage_backlog", "Calls waiting for a stage", labels=["stage"])
    working = GaugeMetricFamily(
        "bcfy_stage_in_flight", "Calls a stage is working on", labels=["stage"]
    )
    done = CounterMetricFamily(
        "bcfy_stage_done", "Calls a stage has finished (ingest: stored)", labels=["stage"]
    )
    failed = CounterMetricFamily("bcfy_stage_failed", "Calls a stage gave up on", labels=["stage"])
    for name, stage in snap.stages.items():
        backlog.add_metric([name], stage.backlog)
        working.add_metric([name], stage.in_flight)
        if name in snap.totals:
            done.add_metric([name], snap.totals[name]["done"])
            failed.add_metric([name], snap.totals[name]["failed"])
    yield from (backlog, working, done, failed)

    if "polls" in snap.totals:
        polls = CounterMetricFamily("bcfy_polls", "Polls of the live endpoint", labels=["outcome"])
        polls.add_metric(["ok"], snap.totals["polls"]["ok"])
        polls.add_metric(["error"], snap.totals["polls"]["error"])
        yield polls
        quarantined = CounterMetricFamily(
            "bcfy_quarantined_records", "Call records refused and kept in quarantine"
        )
        quarantined.add_metric([], snap.totals["ingest"]["failed"])
        yield quarantined

    skips = CounterMetricFamily(
        "bcfy_lock_skips", "Runs skipped because the job was running", labels=["job"]
    )
    held = GaugeMetricFamily("bcfy_lock_held", "1 while a run holds the job's lock", labels=["job"])
    for job, info in snap.jobs.items():
        if "lock_skips" in info:
            skips.add_metric([job], info["lock_skips"])
            held.add_metric([job], 1 if info.get("lock_holder") else 0)
    yield from (skips, held)

    runs = CounterMetricFamily(
        "bcfy_job_runs", "Periodic job runs by outcome", labels=["job", "outcome"]
    )
    for job, by_outcome in sorted(snap.job_run_totals.items()):
        for outcome, n in sorted(by_outcome.items()):
            runs.add_metric([job, outcome], n)
    yield runs

    depth = GaugeMetricFamily("bcfy_queue_depth", "Messages waiting in a queue", labels=["queue"])
    for queue, n in snap.queues.items():
        depth.add_metric([queue], n)
    yield depth
    online = GaugeMetricFamily(
        "bcfy_workers_online", "Worker processes consuming a queue", labels=["queue"]
    )
    for queue, nodes in snap.workers.items():
        online.add_metric([queue], len(nodes))
    yield online

    latency = GaugeMetricFamily(
        "bcfy_call_to_transcript_seconds",
        "From a call stored to its transcript, over a recent window",
        labels=["window", "quantile", "recognition"],
    )
    for window, lat in snap.latency_sec.items():
        if lat.get("calls"):
            latency.add_metric([window, "0.5", "included"], lat["p50"])
            latency.add_metric([window, "0.95", "included"], lat["p95"])
            latency.add_metric([window, "0.95", "excluded"], lat["p95_excluding_recognition"])
    yield latency


def add_commands(sub: Any) -> None:
    metrics = sub.add_parser("metrics", help="serve the pipeline's Prometheus metrics")
    metrics.add_argument("--port", type=int, help="default: METRICS_PORT")
    metrics.add_argument("--address", default="0.0.0.0")
    metrics.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    REGISTRY.register(PipelineCollector(settings))
    port = args.port or settings.metrics_port
    start_http_server(port, addr=args.address)
    print(f"metrics on http://{args.address}:{port}/metrics", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
