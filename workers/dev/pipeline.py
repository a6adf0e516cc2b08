"""The whole pipeline as production runs it, fed by the feed simulator on the real clock: for
tests/e2e/test_pipeline.py and bench/e2e.py.

    with Pipeline(database_url, redis_url, workdir) as p:   # the simulator, over real HTTP
        p.follow_playlists(2)          # `bcfy playlists add` for each (one warm-up call each)
        p.start()                      # beat and the three pools, as `bcfy beat|worker` start them
        p.wait_for_warmup()            # the warm-up calls transcribed: the pipeline is live
        p.run_traffic(rate=0.4, duration=60)   # Poisson arrivals, calls/s over the playlists
        p.drain(timeout=90)            # every call stored, prepared and transcribed (or failed)
        p.quiesce()                    # beat stopped, queues empty, nothing unacknowledged
        calls = p.calls()              # one CallRecord per stored call, with its timings

Publication times are taken here, where each call is published (`FeedSimulator.publish_call`,
the simulator's clock being the real one): `published[url]` is the moment just before the call
entered the feed, so a latency measured from it is never flattering. A call becomes visible to
the service's clients at the next whole second (the simulator's position rule), then waits for
the next poll; that wait is part of every latency here, as it is for a user.

Stage backlogs are sampled every second while traffic runs (`Sampler`): calls published but not
stored (poll), stored but not prepared (audio), prepared but not yet sent to the pool (dispatch),
sent but not transcribed (transcription).
"""

from __future__ import annotations

import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psycopg
import redis
from celery import Celery
from psycopg.rows import TupleRow

from beat_schedule import QUEUES, task_routes
from workers.core.processes import beat_argv, worker_argv
from workers.core.rows import one_row
from workers.core.settings import load_settings
from workers.dev.hosts import HostNetwork
from workers.dev.procs import CLK_TCK, Proc, run_cli, wait_until
from workers.dev.services import Servers
from workers.dev.simulator import FeedSimulator

STAGES = ("poll", "audio", "dispatch", "transcription")
POLL_JOB = "tasks.ingest.poll_followed_playlists"

# Everything the pipeline stores, emptied before a run (the rest hangs off bcfy_calls_raw and
# bcfy_playlists by foreign key).
TABLES = "bcfy_calls_raw, bcfy_playlists, bcfy_playlist_poll_log, bcfy_calls_quarantine, job_runs"


# --- traffic ---------------------------------------------------------------------------------


def arrival_offsets(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrivals at `rate` per second within [0, duration): seconds from the start."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


class Traffic(threading.Thread):
    """Publishes calls at the given offsets, each on a playlist picked at random, and keeps the
    moment each was published (url -> unix time)."""

    def __init__(
        self,
        sim: FeedSimulator,
        playlists: Sequence[str],
        offsets: Sequence[float],
        seed: int,
        published: dict[str, float],
    ) -> None:
        super().__init__(name="e2e-traffic", daemon=True)
        self.sim, self.playlists, self.offsets = sim, list(playlists), list(offsets)
        self.rng = random.Random(f"{seed}:playlists")
        self.published = published
        self.started_at = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.started_at = time.time()
        for offset in self.offsets:
            due = self.started_at + offset
            if self._stop_event.wait(max(0.0, due - time.time())):
                return
            playlist = self.rng.choice(self.playlists)
            at = time.time()
            record = self.sim.publish_call(playlist)
            self.published[record["url"]] = at

    def stop(self) -> None:
        self._stop_event.set()


# --- sampling the stages ---------------------------------------------------------------------

_COUNTS = """
SELECT (SELECT count(*) FROM bcfy_calls_raw),
       (SELECT count(*) FROM call_audio WHERE state IN ('ready', 'failed')),
       (SELECT count(*) FROM call_transcription WHERE state = 'pending'),
       (SELECT count(*) FROM call_transcription WHERE state IN ('dispatched', 'running')),
       (SELECT count(*) FROM call_transcription WHERE state IN ('done', 'failed'))
"""


@dataclass(frozen=True)
class Sample:
    t: float  # unix time
    published: int
    stored: int
    audio_settled: int  # ready or failed
    dispatch_pending: int  # prepared, not yet sent to the pool
    in_pool: int  # sent to the pool (queued, running, or waiting to retry), not finished
    transcribed: int  # done or failed
    queued: dict[str, int]  # messages waiting per queue (LLEN)

    def backlog(self, stage: str) -> int:
        """Calls that have reached `stage` and not got through it."""
        return {
            "poll": self.published - self.stored,
            "audio": self.stored - self.audio_settled,
            "dispatch": self.dispatch_pending,
            "transcription": self.in_pool,
        }[stage]


def queue_lengths(broker: redis.Redis, *, unacked: bool = False) -> dict[str, int]:
    """Messages waiting per queue (LLEN), in one round trip; with `unacked`, also "unacked":
    messages taken by a worker and not yet acknowledged (HLEN)."""
    names = QUEUES + (("unacked",) if unacked else ())
    pipe = broker.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.llen(queue)
    if unacked:
        pipe.hlen("unacked")
    return dict(zip(names, map(int, pipe.execute()), strict=True))


def take_sample(db: psycopg.Connection[TupleRow], broker: redis.Redis, published: int) -> Sample:
    stored, audio_settled, dispatch_pending, in_pool, transcribed = one_row(
        db.execute(_COUNTS).fetchone(), "the sampler's counts"
    )
    return Sample(
        time.time(),
        published,
        stored,
        audio_settled,
        dispatch_pending,
        in_pool,
        transcribed,
        queued=queue_lengths(broker),
    )


class Sampler(threading.Thread):
    """Samples every stage once a second on its own connections, until stopped."""

    def __init__(
        self, database_url: str, redis_url: str, published: dict[str, float], every: float = 1.0
    ) -> None:
        super().__init__(name="e2e-sampler", daemon=True)
        self.database_url, self.redis_url = database_url, redis_url
        self.published, self.every = published, every
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with (
            psycopg.connect(self.database_url, autocommit=True) as db,
            redis.Redis.from_url(self.redis_url) as broker,
        ):
            next_at = time.monotonic()
            while True:
                self.samples.append(take_sample(db, broker, len(self.published)))
                next_at += self.every
                if self._stop_event.wait(max(0.0, next_at - time.monotonic())):
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def slope_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of y over x and its standard error (inf with fewer than 3 points)."""
    if len(points) < 2:
        return 0.0, math.inf
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0, math.inf
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    if len(points) < 3:
        return b, math.inf
    residuals = sum((y - my - b * (x - mx)) ** 2 for x, y in points)
    return b, math.sqrt(residuals / (len(points) - 2) / sxx)


def period_means(
    samples: Sequence[Sample],
    start: float,
    end: float,
    period: float,
    value: Callable[[Sample], float],
) -> list[tuple[float, float]]:
    """(middle, mean of value(sample)) for each whole `period` from `start` within `end`.

    Polling makes every count a staircase with one step per poll interval; a mean over a whole
    interval does not depend on where in the interval it starts, so slopes over these means
    are free of the staircase's phase."""
    out = []
    for i in range(int((end - start) // period)):
        a = start + i * period
        inside = [value(s) for s in samples if a <= s.t < a + period]
        if inside:
            out.append((a + period / 2, statistics.fmean(inside)))
    return out


# --- per-call results ------------------------------------------------------------------------

_CALLS = """
SELECT r.id, r.url, extract(epoch FROM r.created_at)::float8,
       a.state, extract(epoch FROM a.ready_at)::float8,
       (SELECT count(*) FROM call_audio_attempts x WHERE x.call_id = r.id AND x.outcome = 'ready'),
       t.state, t.attempts, t.dispatch_count,
       extract(epoch FROM t.dispatched_at)::float8, extract(epoch FROM t.claimed_at)::float8,
       extract(epoch FROM t.finished_at)::float8,
       (SELECT count(*) FROM transcripts y WHERE y.call_id = r.id),
       tr.processing_sec, tr.audio_duration_sec
  FROM bcfy_calls_raw r
  LEFT JOIN call_audio a ON a.call_id = r.id
  LEFT JOIN call_transcription t ON t.call_id = r.id
  LEFT JOIN transcripts tr ON tr.call_id = r.id
 ORDER BY r.id
"""


@dataclass(frozen=True)
class CallRecord:
    """One stored call and what became of it (times are unix seconds)."""

    id: int
    url: str
    stored_at: float
    audio_state: str | None
    ready_at: float | None
    audio_ready_count: int  # attempts that ended ready
    transcription_state: str | None
    transcription_attempts: int | None
    dispatch_count: int | None
    dispatched_at: float | None
    claimed_at: float | None
    finished_at: float | None
    transcripts: int
    recognition_sec: float | None
    audio_sec: float | None


def read_calls(db: psycopg.Connection[TupleRow]) -> list[CallRecord]:
    return [CallRecord(*row) for row in db.execute(_CALLS).fetchall()]


class _Timeline(NamedTuple):
    """A published call's way through both stages (unix seconds; recognition: seconds)."""

    published: float
    stored: float
    ready: float
    dispatched: float
    claimed: float
    finished: float
    recognition: float

    @staticmethod
    def of(c: CallRecord, published: dict[str, float]) -> _Timeline | None:
        """None for a call not published by this run or not through both stages yet."""
        if (
            c.url not in published
            or c.ready_at is None
            or c.dispatched_at is None
            or c.claimed_at is None
            or c.finished_at is None
            or c.recognition_sec is None
        ):
            return None
        return _Timeline(
            published[c.url],
            c.stored_at,
            c.ready_at,
            c.dispatched_at,
            c.claimed_at,
            c.finished_at,
            float(c.recognition_sec),
        )


@dataclass(frozen=True)
class Latency:
    """Call-to-transcript latencies (seconds) of the calls given, and where the time went."""

    calls: int
    included: list[float]  # publication to transcript stored
    excluded: list[float]  # the same less the call's own recognition time
    poll: list[float]  # publication to stored
    audio: list[float]  # stored to audio ready
    dispatch: list[float]  # audio ready to sent to the transcription queue
    queue: list[float]  # sent to claimed by a transcription process (waiting for a free one)
    recognition: list[float]  # the recogniser's own time
    store: list[float]  # claimed to stored, less recognition

    @property
    def pipeline(self) -> list[float]:
        """Publication to transcript less recognising and waiting for a free recogniser: what
        the pipeline's own machinery (polling, audio, dispatch, storing) takes."""
        return [e - q for e, q in zip(self.excluded, self.queue, strict=True)]

    @staticmethod
    def of(calls: Sequence[CallRecord], published: dict[str, float]) -> Latency:
        done = [t for c in calls if (t := _Timeline.of(c, published)) is not None]
        return Latency(
            calls=len(done),
            included=[t.finished - t.published for t in done],
            excluded=[t.finished - t.published - t.recognition for t in done],
            poll=[t.stored - t.published for t in done],
            audio=[t.ready - t.stored for t in done],
            dispatch=[t.dispatched - t.ready for t in done],
            queue=[t.claimed - t.dispatched for t in done],
            recognition=[t.recognition for t in done],
            store=[t.finished - t.claimed - t.recognition for t in done],
        )

    def summary(self) -> str:
        def pct(values: list[float]) -> str:
            return f"p50 {percentile(values, 50):5.2f} s  p95 {percentile(values, 95):5.2f} s"

        return "\n".join(
            [
                f"call-to-transcript latency over {self.calls} calls:",
                f"  recognition excluded                     {pct(self.excluded)}",
                f"  recognition included                     {pct(self.included)}",
                f"  less waiting for a free recogniser too   {pct(self.pipeline)}",
                f"  publication -> stored (poll wait)        {pct(self.poll)}",
                f"  stored -> audio ready                    {pct(self.audio)}",
                f"  audio ready -> sent to the pool          {pct(self.dispatch)}",
                f"  sent -> claimed by a pool process        {pct(self.queue)}",
                f"  recognition                              {pct(self.recognition)}",
                f"  claimed -> stored, less recognition      {pct(self.store)}",
            ]
        )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# --- CPU -------------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


# --- the pipeline ----------------------------------------------------------------------------


@dataclass
class Pipeline:
    """The simulator, beat and the three pools, pointed at one database and Redis index."""

    database_url: str
    redis_url: str
    workdir: Path
    seed: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    # Test hosts to run the processes on (start's layout), and the simulator listening on
    # their bridge's address; None: everything on this machine, the simulator on loopback.
    network: HostNetwork | None = None
    sim: FeedSimulator = field(init=False)
    env: dict[str, str] = field(init=False)
    procs: dict[str, Proc] = field(init=False, default_factory=dict)
    playlists: list[str] = field(init=False, default_factory=list)
    published: dict[str, float] = field(init=False, default_factory=dict)
    warmup: set[str] = field(init=False, default_factory=set)
    traffic: Traffic | None = field(init=False, default=None)
    sampler: Sampler | None = field(init=False, default=None)

    def __enter__(self) -> Pipeline:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sim_host = self.network.bridge_address if self.network else "127.0.0.1"
        self.sim = FeedSimulator(seed=self.seed, host=sim_host).start()
        self.env = Servers(self.database_url, self.redis_url).worker_env(
            self.workdir,
            AUDIO_STORE_DIR=str(self.workdir / "audio"),
            **self.sim.pipeline_env(),
            LOG_LEVEL="INFO",
            **self.extra_env,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        if self.sampler is not None and self.sampler.is_alive():
            self.sampler.stop()
        self.stop_processes()
        self.sim.stop()

    # --- set-up ------------------------------------------------------------------------------

    def db(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(self.database_url, autocommit=True)

    def empty(self) -> None:
        """No calls, playlists or run log; no queued messages, locks or leftovers in Redis."""
        with self.db() as conn:
            conn.execute(f"TRUNCATE {TABLES} CASCADE")
        with redis.Redis.from_url(self.redis_url) as client:
            for key in client.scan_iter("*"):
                if not key.startswith(b"bcfy:test-session") and not key.startswith(b"bcfy:bench"):
                    client.delete(key)

    def follow_playlists(self, n: int) -> list[str]:
        """Make `n` playlists on the simulator, each with one call already published (the
        warm-up: its first poll then sets the cursor), and follow each with `bcfy playlists
        add`, as an operator does."""
        for i in range(n):
            uuid = self.sim.add_playlist(name=f"E2E playlist {i + 1}")
            at = time.time()
            record = self.sim.publish_call(uuid)
            self.published[record["url"]] = at
            self.warmup.add(record["url"])
            self.playlists.append(uuid)
        for uuid in self.playlists:
            out = run_cli("playlists", "add", uuid, env=self.env)
            if out.returncode != 0:
                raise RuntimeError(f"bcfy playlists add failed: {out.stderr or out.stdout}")
        return self.playlists

    def start(self, layout: Mapping[str, Sequence[str]] | None = None) -> None:
        """Beat and the pools, with the command lines `bcfy beat|worker` use: all on this
        machine (processes `worker-<queue>` and `beat`), or as `layout` places them on the
        hosts of `network`: host name -> its roles, each a queue's pool or "beat" (processes
        `<host>.<role>`). Beat starts once every pool is ready."""
        settings = load_settings({**os.environ, **self.env})
        placed = [
            (host, role)
            for host, roles in (layout or {"": (*QUEUES, "beat")}).items()
            for role in roles
        ]
        for starting, ready in (("pools", " ready."), ("beat", "beat: Starting...")):
            started = []
            for host, role in placed:
                if (role == "beat") != (starting == "beat"):
                    continue
                argv = beat_argv(settings) if role == "beat" else worker_argv(role, settings)
                name = f"{host}.{role}" if host else "beat" if role == "beat" else f"worker-{role}"
                if host and self.network is not None:
                    host_ = self.network.hosts[host]
                    proc = self.network.start(host_, name, argv, self.env, self.workdir)
                else:
                    proc = Proc(name, argv, self.env, self.workdir)
                self.procs[name] = proc
                started.append(proc)
            for proc in started:
                proc.wait_for_log(ready, timeout=90)

    def procs_on(self, host: str) -> list[Proc]:
        """The processes start placed on `host`."""
        return [proc for name, proc in self.procs.items() if name.startswith(f"{host}.")]

    def stop_host(self, host: str) -> dict[str, int | None]:
        """Stop (warm shutdown) the processes start placed on `host`; their exit codes."""
        codes = {}
        for name in [n for n in self.procs if n.startswith(f"{host}.")]:
            proc = self.procs.pop(name)
            proc.stop(timeout=30)
            codes[name] = proc.popen.returncode
        return codes

    def trigger(self, task: str) -> None:
        """Send a job its trigger by name, as the stages do."""
        client = Celery(broker=self.redis_url)
        # Routed to the job's queue, as the stages send it (unrouted, it would go to "celery").
        client.conf.update(
            task_serializer="json", accept_content=["json"], task_routes=task_routes()
        )
        try:
            client.send_task(task)
        finally:
            client.close()

    def wait_for_warmup(self, timeout: float = 60) -> None:
        """The warm-up calls polled (at once, by a trigger), prepared and transcribed."""
        self.trigger(POLL_JOB)
        wait_until(
            lambda: self.transcribed(self.warmup) == len(self.warmup),
            timeout,
            "the warm-up calls to be transcribed",
            every=0.2,
        )

    def transcribed(self, urls: set[str]) -> int:
        with self.db() as conn:
            (n,) = one_row(
                conn.execute(
                    "SELECT count(*) FROM transcripts t JOIN bcfy_calls_raw r ON r.id = t.call_id"
                    " WHERE r.url = ANY(%s)",
                    (list(urls),),
                ).fetchone()
            )
        return int(n)

    # --- running -----------------------------------------------------------------------------

    def run_traffic(self, rate: float, duration: float, *, seed: int | None = None) -> Traffic:
        """Publish Poisson arrivals at `rate` calls/s for `duration` s (blocks), sampling the
        stages meanwhile; the sampler goes on until `drain` has finished."""
        offsets = arrival_offsets(rate, duration, self.seed if seed is None else seed)
        self.sampler = Sampler(self.database_url, self.redis_url, self.published)
        self.sampler.start()
        self.traffic = Traffic(self.sim, self.playlists, offsets, self.seed, self.published)
        self.traffic.start()
        self.traffic.join(duration + 30)
        return self.traffic

    def settled(self) -> bool:
        """Every published call stored, and every stored call through both stages (or failed)."""
        with self.db() as conn:
            (stored,) = one_row(
                conn.execute(
                    "SELECT count(*) FROM bcfy_calls_raw WHERE url = ANY(%s)",
                    (list(self.published),),
                ).fetchone()
            )
            (open_calls,) = one_row(
                conn.execute(
                    """SELECT count(*) FROM bcfy_calls_raw r
                         LEFT JOIN call_audio a ON a.call_id = r.id
                         LEFT JOIN call_transcription t ON t.call_id = r.id
                        WHERE a.state IS DISTINCT FROM 'failed'
                          AND t.state IS DISTINCT FROM 'done'
                          AND t.state IS DISTINCT FROM 'failed'"""
                ).fetchone()
            )
        return bool(stored >= len(self.published) and open_calls == 0)

    def drain(self, timeout: float) -> float:
        """Wait until settled; returns the seconds it took after the traffic ended."""
        t0 = time.monotonic()
        try:
            wait_until(self.settled, timeout, "the pipeline to drain", every=0.25)
        finally:
            if self.sampler is not None:
                self.sampler.stop()
        return time.monotonic() - t0

    def quiesce(self, timeout: float = 30) -> None:
        """Stop beat, then wait until no message is queued or unacknowledged."""
        for name in [n for n in self.procs if n == "beat" or n.endswith(".beat")]:
            self.procs.pop(name).stop()

        def idle() -> bool:
            with redis.Redis.from_url(self.redis_url) as client:
                return not any(queue_lengths(client, unacked=True).values())

        wait_until(idle, timeout, "every queue empty and every message acknowledged", every=0.2)

    def stop_processes(self) -> dict[str, int | None]:
        """SIGTERM (warm shutdown) to each; returns their exit codes."""
        codes = {}
        for name, proc in list(self.procs.items()):
            proc.stop(timeout=30)
            codes[name] = proc.popen.returncode
        self.procs.clear()
        return codes

    # --- results -----------------------------------------------------------------------------

    def calls(self) -> list[CallRecord]:
        with self.db() as conn:
            return read_calls(conn)

    def job_runs(self) -> dict[tuple[str, str], int]:
        with self.db() as conn:
            rows = conn.execute("SELECT job, outcome, count(*) FROM job_runs GROUP BY 1, 2")
            return {(job, outcome): n for job, outcome, n in rows.fetchall()}

    def job_errors(self) -> list[tuple[str, str, str | None]]:
        with self.db() as conn:
            return conn.execute(
                "SELECT job, outcome, error FROM job_runs WHERE outcome IN ('error', 'lost_lock')"
                " ORDER BY started_at"
            ).fetchall()

    def logs(self) -> Iterator[tuple[str, str]]:
        for path in sorted(self.workdir.glob("*.log")):
            yield path.stem, path.read_text(errors="replace")
