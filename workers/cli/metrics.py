"""`bcfy metrics`: the pipeline's own Prometheus metrics on a scrape endpoint.

Flower serves Celery's task metrics on its own /metrics; this adds what only the pipeline
knows: each stage's backlog and totals, poll errors, quarantined records, lock skips, job run
outcomes, queue depths, workers online and call-to-transcript latency, from a `workers.cli.status`
snapshot (the same numbers as `bcfy status`).

It has no login, so it listens on loopback unless METRICS_ADDRESS says otherwise. A crowd of
scrapers costs no more than one: a reading younger than METRICS_CACHE_SEC is served as it is,
one reading is taken at a time, on the one connection of a small pool, and at most
METRICS_MAX_CONCURRENCY requests are served at once (more wait their turn).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import _SilentHandler
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from workers.cli import Subparsers
from workers.cli.status import Snapshot, snapshot
from workers.core.settings import Settings

APPLICATION_NAME = "bcfy-metrics"  # how its connections show in pg_stat_activity


class CachedSnapshot:
    """The latest reading, taken again when older than METRICS_CACHE_SEC; one at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = ConnectionPool(
            settings.services.database_url.reveal(),
            min_size=1,
            max_size=1,
            timeout=settings.services.db_connect_timeout_sec,
            kwargs={
                "autocommit": True,
                "connect_timeout": int(settings.services.db_connect_timeout_sec),
                "application_name": APPLICATION_NAME,
            },
            name=APPLICATION_NAME,
            open=False,
        )
        self.pool.open(wait=False)
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._taken_at = 0.0
        self._took = 0.0

    def get(self) -> tuple[Snapshot, float, float]:
        """(snapshot, seconds it took to read, its age in seconds)."""
        with self._lock:
            now = time.monotonic()
            if (
                self._snap is None
                or now - self._taken_at >= self.settings.operations.metrics_cache_sec
            ):
                self._snap = snapshot(self.settings, totals=True, connect=self.pool.connection)
                self._taken_at = time.monotonic()
                self._took = self._taken_at - now
            return self._snap, self._took, time.monotonic() - self._taken_at

    def close(self) -> None:
        self.pool.close()


class PipelineCollector(Collector):
    def __init__(self, source: CachedSnapshot) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap, took_sec, age_sec = self.source.get()
        yield from families(snap)
        up = GaugeMetricFamily("bcfy_scrape_ok", "1 when every source answered this reading")
        up.add_metric([], 0 if snap.problems else 1)
        yield up
        took = GaugeMetricFamily("bcfy_scrape_seconds", "Time taken to read the snapshot")
        took.add_metric([], took_sec)
        yield took
        age = GaugeMetricFamily(
            "bcfy_scrape_age_seconds", "Age of the reading served (at most METRICS_CACHE_SEC)"
        )
        age.add_metric([], age_sec)
        yield age


def families(snap: Snapshot) -> Iterator[Metric]:
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
        quantiles = (
            ("0.5", "included", lat["p50"]),
            ("0.95", "included", lat["p95"]),
            ("0.95", "excluded", lat["p95_excluding_recognition"]),
        )
        for quantile, recognition, seconds in quantiles:
            if lat["calls"] and seconds is not None:  # none without a call in the window
                latency.add_metric([window, quantile, recognition], seconds)
    yield latency


_Request = socket.socket | tuple[bytes, socket.socket]  # (socketserver's; a socket here)


class BoundedWSGIServer(WSGIServer):
    """Serves requests on a fixed number of threads; further connections wait their turn."""

    def __init__(self, *args: Any, threads: int = 4, **kwargs: Any) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="metrics")
        super().__init__(*args, **kwargs)

    def process_request(self, request: _Request, client_address: Any) -> None:
        self.executor.submit(self._handle, request, client_address)

    def _handle(self, request: _Request, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def serve(settings: Settings, address: str, port: int) -> tuple[BoundedWSGIServer, CachedSnapshot]:
    """The endpoint, listening; `serve_forever()` on the server runs it."""
    source = CachedSnapshot(settings)
    REGISTRY.register(PipelineCollector(source))
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    class Server(BoundedWSGIServer):
        address_family = family

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, threads=settings.operations.metrics_max_concurrency, **kwargs)

    server = make_server(address, port, make_wsgi_app(REGISTRY), Server, _SilentHandler)
    return server, source


def add_commands(sub: Subparsers) -> None:
    metrics = sub.add_parser("metrics", help="serve the pipeline's Prometheus metrics")
    metrics.add_argument("--port", type=int, help="default: METRICS_PORT")
    metrics.add_argument("--address", help="default: METRICS_ADDRESS (loopback)")
    metrics.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    address = args.address or settings.operations.metrics_address
    port = args.port or settings.operations.metrics_port
    server, source = serve(settings, address, port)
    shown = f"[{address}]" if ":" in address else address
    print(f"metrics on http://{shown}:{port}/metrics", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        source.close()
    return 0
