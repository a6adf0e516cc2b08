"""The pipeline at a glance: `bcfy status [--json]`, and the numbers behind the metrics endpoint.

One snapshot, read from PostgreSQL (the pipeline's state), Redis (locks, skip counters, queue
depths) and the workers themselves (who is online, on which queue). Every part is best effort:
an unreachable part is reported as such, the rest still shown.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

import psycopg
import redis
from psycopg.rows import TupleRow

from beat_schedule import PERIODIC_JOBS, QUEUES
from workers.cli import Subparsers
from workers.core import clock, rows
from workers.core.counters import COUNTERS
from workers.core.locks import holder_of, late_count, skip_count
from workers.core.settings import Settings
from workers.core.text import terminal_safe

WINDOWS = {"5m": "5 minutes", "1h": "1 hour"}


@dataclass
class Stage:
    backlog: int = 0  # waiting for this stage
    in_flight: int = 0  # being worked on now
    done: dict[str, int] = field(default_factory=dict)  # per window
    failed: dict[str, int] = field(default_factory=dict)  # per window
    failed_total: int = 0
    top_failures: list[tuple[str, int]] = field(default_factory=list)  # reason, calls (24 h)


class Latency(TypedDict):
    """From a call stored to its transcript over one window; the quantiles are None when no
    call was transcribed in it."""

    p50: float | None
    p95: float | None
    p95_excluding_recognition: float | None
    calls: int


@dataclass
class Snapshot:
    generated_at: str
    stages: dict[str, Stage] = field(default_factory=dict)
    latency_sec: dict[str, Latency] = field(default_factory=dict)
    playlists: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)
    workers: dict[str, list[str]] = field(default_factory=dict)
    # Only with totals=True (the metrics endpoint): all-time counts, for Prometheus counters.
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    job_run_totals: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Each worker's (and beat's) clock offset from Redis's, by node; and warnings about them.
    clocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    clock_warnings: list[str] = field(default_factory=list)


# --- PostgreSQL -------------------------------------------------------------------------------

_INGEST = """
SELECT
  (SELECT count(*) FROM bcfy_calls_raw WHERE created_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM bcfy_calls_raw WHERE created_at > now() - interval '1 hour'),
  (SELECT count(*) FROM bcfy_playlist_poll_log
    WHERE NOT success AND poll_started_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM bcfy_playlist_poll_log
    WHERE NOT success AND poll_started_at > now() - interval '1 hour'),
  (SELECT count(*) FROM bcfy_calls_quarantine)
"""
_INGEST_FAILURES = """
SELECT coalesce(left(split_part(error, E'\\n', 1), 120), 'unknown'), count(*)
  FROM bcfy_playlist_poll_log
 WHERE NOT success AND poll_started_at > now() - interval '24 hours'
 GROUP BY 1 ORDER BY 2 DESC LIMIT 5
"""
# Each count reads one index range (call_audio keeps a row per call, for ever by default).
_AUDIO = """
SELECT
  (SELECT count(*) FROM call_audio WHERE state = 'pending'),
  (SELECT count(*) FROM call_audio WHERE state = 'downloading'),
  (SELECT count(*) FROM call_audio
    WHERE state = 'ready' AND ready_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM call_audio WHERE state = 'ready' AND ready_at > now() - interval '1 hour'),
  (SELECT count(*) FROM call_audio
    WHERE state = 'failed' AND updated_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM call_audio
    WHERE state = 'failed' AND updated_at > now() - interval '1 hour'),
  (SELECT count(*) FROM call_audio WHERE state = 'failed')
"""
_AUDIO_FAILURES = """
SELECT coalesce(error_code, left(split_part(last_error, E'\\n', 1), 120), 'unknown'), count(*)
  FROM call_audio
 WHERE state = 'failed' AND updated_at > now() - interval '24 hours'
 GROUP BY 1 ORDER BY 2 DESC LIMIT 5
"""
_TRANSCRIPTION = """
SELECT
  (SELECT count(*) FROM call_transcription WHERE state IN ('pending', 'dispatched')),
  (SELECT count(*) FROM call_transcription WHERE state = 'running'),
  (SELECT count(*) FROM transcripts WHERE created_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM transcripts WHERE created_at > now() - interval '1 hour'),
  (SELECT count(*) FROM call_transcription
    WHERE state = 'failed' AND finished_at > now() - interval '5 minutes'),
  (SELECT count(*) FROM call_transcription
    WHERE state = 'failed' AND finished_at > now() - interval '1 hour'),
  (SELECT count(*) FROM call_transcription WHERE state = 'failed')
"""
_TRANSCRIPTION_FAILURES = """
SELECT coalesce(left(split_part(last_error, E'\\n', 1), 120), 'unknown'), count(*)
  FROM call_transcription
 WHERE state = 'failed' AND finished_at > now() - interval '24 hours'
 GROUP BY 1 ORDER BY 2 DESC LIMIT 5
"""
# From the moment a call was stored to its transcript, and the part spent recognising.
_LATENCY = """
SELECT
  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM t.created_at - c.created_at)),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM t.created_at - c.created_at)),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM t.created_at - c.created_at)
                                               - coalesce(t.processing_sec, 0)),
  count(*)
  FROM transcripts t JOIN bcfy_calls_raw c ON c.id = t.call_id
 WHERE t.created_at > now() - %s::interval
"""
_PLAYLISTS = """
SELECT p.uuid::text, p.name, p.sync, p.cursor_pos, l.poll_started_at, l.success, l.error,
       l.calls_new, l.http_status
  FROM bcfy_playlists p
  LEFT JOIN LATERAL (
        SELECT poll_started_at, success, error, calls_new, http_status
          FROM bcfy_playlist_poll_log WHERE playlist_uuid = p.uuid
         ORDER BY poll_started_at DESC LIMIT 1) l ON true
 ORDER BY p.name NULLS LAST, p.uuid
"""


_CHECKPOINTS = "SELECT kind, upto FROM history_checkpoints"
# The checkpoints read just before go in as parameters, so that each live count is planned as
# the index range it is; the same statement re-reads them, so that a fold committed in between
# is neither counted twice nor missed (the sums and the live counts share one snapshot).
_COUNTERS = (
    "SELECT kind, label, outcome, sum(n)::bigint FROM (\n"
    "  SELECT kind, label, outcome, n FROM history_totals\n"
    + "".join(
        f"  UNION ALL SELECT '{c.kind}', {c.label}, {c.outcome}, count(*) FROM {c.table}"
        f" WHERE {c.where} AND {c.time} > %({c.kind})s::timestamptz AND {c.time} > coalesce("
        f"(SELECT upto FROM history_checkpoints WHERE kind = '{c.kind}'), '-infinity')"
        " GROUP BY 2, 3\n"
        for c in COUNTERS
    )
    + ") t GROUP BY 1, 2, 3"
)
# Each job's last run: one index probe per job (a loose index scan), not a scan of the log.
_LAST_RUNS = """
WITH RECURSIVE jobs(job) AS (
    (SELECT job FROM job_runs ORDER BY job LIMIT 1)
    UNION ALL
    SELECT (SELECT r.job FROM job_runs r WHERE r.job > jobs.job ORDER BY r.job LIMIT 1)
      FROM jobs WHERE jobs.job IS NOT NULL
)
SELECT last.job, last.outcome, last.started_at, last.ended_at, last.error
  FROM jobs
  CROSS JOIN LATERAL (
        SELECT job, outcome, started_at, ended_at, error FROM job_runs r
         WHERE r.job = jobs.job ORDER BY started_at DESC LIMIT 1) last
 WHERE jobs.job IS NOT NULL
 ORDER BY last.job
"""


def counters(conn: psycopg.Connection[TupleRow]) -> dict[tuple[str, str, str], int]:
    """Every counter of COUNTERS: {(kind, label, outcome): all-time count}."""
    upto = {c.kind: "-infinity" for c in COUNTERS}
    upto |= {kind: at for kind, at in conn.execute(_CHECKPOINTS)}
    return {(k, label, outcome): n for k, label, outcome, n in conn.execute(_COUNTERS, upto)}


def _stage(row: TupleRow, failures: list[TupleRow]) -> Stage:
    backlog, in_flight, done5, done1, fail5, fail1, failed = row
    return Stage(
        backlog=backlog,
        in_flight=in_flight,
        done={"5m": done5, "1h": done1},
        failed={"5m": fail5, "1h": fail1},
        failed_total=failed,
        top_failures=[(str(reason), int(n)) for reason, n in failures],
    )


def totals(
    conn: psycopg.Connection[TupleRow], counted: dict[tuple[str, str, str], int] | None = None
) -> dict[str, dict[str, int]]:
    """All-time counts per stage (done, failed) and of polls (ok, error)."""
    n = counters(conn) if counted is None else counted

    def get(kind: str, outcome: str = "") -> int:
        return n.get((kind, "", outcome), 0)

    return {
        "ingest": {"done": get("calls"), "failed": get("quarantine")},
        "audio": {"done": get("audio_ready"), "failed": get("audio_failed")},
        "transcription": {"done": get("transcripts"), "failed": get("transcription_failed")},
        "polls": {"ok": get("polls", "ok"), "error": get("polls", "error")},
    }


def _totals(snap: Snapshot, conn: psycopg.Connection[TupleRow]) -> None:
    counted = counters(conn)
    snap.totals = totals(conn, counted)
    for (kind, job, outcome), n in counted.items():
        if kind == "job_runs":
            snap.job_run_totals.setdefault(job, {})[outcome] = n


def _from_database(snap: Snapshot, conn: psycopg.Connection[TupleRow], *, details: bool) -> None:
    """The stages' figures and latency; with `details`, also what only `bcfy status` shows
    (top failures, playlists, each job's last run), which metrics scrapes do without."""

    def failures(query: str) -> list[TupleRow]:
        return conn.execute(query).fetchall() if details else []

    def one_row(query: str, params: tuple[str] | None = None) -> TupleRow:
        # aggregates without GROUP BY: always exactly one row
        return rows.one_row(conn.execute(query, params).fetchone(), "a status query")

    calls5, calls1, polls_failed5, polls_failed1, quarantined = one_row(_INGEST)
    snap.stages["ingest"] = Stage(
        done={"5m": calls5, "1h": calls1},
        failed={"5m": polls_failed5, "1h": polls_failed1},
        failed_total=quarantined,
        top_failures=[(str(r), int(n)) for r, n in failures(_INGEST_FAILURES)],
    )
    snap.stages["audio"] = _stage(one_row(_AUDIO), failures(_AUDIO_FAILURES))
    snap.stages["transcription"] = _stage(
        one_row(_TRANSCRIPTION), failures(_TRANSCRIPTION_FAILURES)
    )
    for window, interval in WINDOWS.items():
        p50, p95, p95_excl, n = one_row(_LATENCY, (interval,))
        snap.latency_sec[window] = {
            "p50": p50,
            "p95": p95,
            "p95_excluding_recognition": p95_excl,
            "calls": n,
        }
    if not details:
        return
    for uuid, name, sync, cursor, polled, ok, error, new, status in conn.execute(_PLAYLISTS):
        snap.playlists.append(
            {
                "uuid": uuid,
                "name": name,
                "sync": sync,
                "cursor": cursor,
                "last_poll_at": polled.isoformat() if polled else None,
                "last_poll_ok": ok,
                "last_poll_new_calls": new,
                "last_poll_http_status": status,
                "last_poll_error": error,
            }
        )
    for job, outcome, started, ended, error in conn.execute(_LAST_RUNS):
        snap.jobs.setdefault(job, {}).update(
            {
                "last_outcome": outcome,
                "last_started_at": started.isoformat(),
                "last_duration_sec": (ended - started).total_seconds(),
                "last_error": error,
            }
        )


# --- Redis and the workers --------------------------------------------------------------------


def periodic_job_names() -> list[str]:
    """The periodic jobs' task names, as beat_schedule.JOBS declares them."""
    return [job.name for job in PERIODIC_JOBS]


def _from_redis(snap: Snapshot, client: redis.Redis) -> None:
    for task in periodic_job_names():
        entry = snap.jobs.setdefault(task, {})
        entry["lock_holder"] = holder_of(client, task)
        entry["lock_skips"] = skip_count(client, task)
    for queue in QUEUES:
        snap.queues[queue] = int(client.llen(queue))


def _from_workers(snap: Snapshot, settings: Settings, timeout: float) -> None:
    from workers.app import app, configure

    configure(settings)
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    online: dict[str, list[str]] = {queue: [] for queue in QUEUES}
    for node, queues in sorted(replies.items()):
        for q in queues:
            online.setdefault(q["name"], []).append(node)
    snap.workers = online


Connect = Callable[[], AbstractContextManager[psycopg.Connection[TupleRow]]]


def snapshot(
    settings: Settings,
    *,
    workers_timeout: float = 1.0,
    totals: bool = False,
    connect: Connect | None = None,
) -> Snapshot:
    """What `bcfy status` shows; with `totals` (metrics), all-time counts instead of the
    details only status shows. `connect` (metrics: its pool's) gives the database connection;
    by default a connection of its own."""
    snap = Snapshot(generated_at=datetime.now(UTC).isoformat(timespec="seconds"))
    parts: list[tuple[str, Callable[[], None]]] = [
        ("database", lambda: _with_db(settings, snap, totals, connect)),
        ("redis", lambda: _with_redis(settings, snap)),
        ("workers", lambda: _from_workers(snap, settings, workers_timeout)),
    ]
    for name, read in parts:
        try:
            read()
        except Exception as exc:
            snap.problems.append(f"{name} unavailable: {type(exc).__name__}: {exc}")
    return snap


def _with_db(settings: Settings, snap: Snapshot, totals: bool, connect: Connect | None) -> None:
    if connect is None:
        url = settings.services.database_url.reveal()
        connect = lambda: psycopg.connect(url, connect_timeout=5)  # noqa: E731
    with connect() as conn:
        _from_database(snap, conn, details=not totals)
        if totals:
            _totals(snap, conn)


def _with_redis(settings: Settings, snap: Snapshot) -> None:
    client = redis.Redis.from_url(settings.services.redis_url.reveal(), socket_timeout=5)
    try:
        _from_redis(snap, client)
        _clock_offsets(snap, client, settings.jobs.misfire_grace_sec)
    finally:
        client.close()


# --- clocks -----------------------------------------------------------------------------------


def _clock_offsets(snap: Snapshot, client: redis.Redis, grace_sec: float) -> None:
    """The offsets workers and beat reported (workers.core.clock), a warning for each one beyond
    a fraction of the grace, and each job's count of ticks dropped as late."""
    now_ms = clock.redis_time_ms(client)
    limit = clock.warn_above(grace_sec)
    for node, report in clock.reports(client).items():
        offset = float(report.get("offset_sec", 0.0))
        kind = str(report.get("kind", "worker"))
        snap.clocks[node] = {
            **report,
            "age_sec": round((now_ms - int(report.get("measured_at_ms", now_ms))) / 1000, 1),
        }
        if abs(offset) > limit:
            snap.clock_warnings.append(
                f"{clock.describe(kind, node, offset)}: more than {clock.WARN_FRACTION:.0%} of "
                f"JOB_MISFIRE_GRACE_SEC ({grace_sec:g}s); ticks are timed by Redis's clock, but "
                "the times it writes (job runs, logs) are off by as much: fix its clock (NTP)"
            )
    for task in periodic_job_names():
        snap.jobs.setdefault(task, {})["late_ticks"] = late_count(client, task)


def render_clocks(snap: Snapshot) -> list[str]:
    out = ["\nclocks (offset from Redis's clock; + ahead):"]
    if not snap.clocks:
        out.append("  no worker has reported")
    for node, c in sorted(snap.clocks.items()):
        offset = float(c.get("offset_sec", 0))
        out.append(
            f"  {c.get('kind', '?'):6} {terminal_safe(node):40} {offset:+8.1f}s"
            f"  (measured {c.get('age_sec', '?')}s ago)"
        )
    late = {job: j["late_ticks"] for job, j in sorted(snap.jobs.items()) if j.get("late_ticks")}
    if late:
        out.append(
            "late ticks dropped (waited longer than JOB_MISFIRE_GRACE_SEC): "
            + ", ".join(f"{job} {n}" for job, n in late.items())
        )
    out += [f"! clock: {terminal_safe(warning)}" for warning in snap.clock_warnings]
    return out


# --- rendering --------------------------------------------------------------------------------


def render(snap: Snapshot) -> str:
    out = [f"bcfy status at {snap.generated_at}", ""]
    out.append(
        f"{'stage':14} {'backlog':>8} {'working':>8} {'done 5m':>8} {'done 1h':>8}"
        f" {'failed 5m':>9} {'failed 1h':>9}"
    )
    for name, st in snap.stages.items():
        out.append(
            f"{name:14} {st.backlog:8} {st.in_flight:8} {st.done['5m']:8} {st.done['1h']:8}"
            f" {st.failed['5m']:9} {st.failed['1h']:9}"
        )
    out.append("  (ingest: done = calls stored, failed = failed polls)")
    for name, st in snap.stages.items():
        if st.top_failures:
            out.append(f"\ntop {name} failures (24 h):")
            out += [f"  {n:6}  {terminal_safe(reason)}" for reason, n in st.top_failures]
    if "ingest" in snap.stages:
        out.append(f"\nquarantined records: {snap.stages['ingest'].failed_total}")
    for window, lat in snap.latency_sec.items():
        if lat.get("calls"):
            out.append(
                f"call to transcript ({window}, {lat['calls']} calls): p50 {lat['p50']:.1f}s"
                f"  p95 {lat['p95']:.1f}s  p95 without recognition "
                f"{lat['p95_excluding_recognition']:.1f}s"
            )
    out.append("\nplaylists:")
    if not snap.playlists:
        out.append("  none followed (bcfy playlists add <uuid>)")
    for p in snap.playlists:
        outcome = {True: "ok", False: "FAILED", None: "never polled"}[p["last_poll_ok"]]
        out.append(
            f"  {p['uuid']}  {terminal_safe(p['name'])}  sync={'on' if p['sync'] else 'off'}"
            f"  cursor={p['cursor']}  last poll {p['last_poll_at'] or '-'} {outcome}"
            + (f": {terminal_safe(p['last_poll_error'])}" if p["last_poll_error"] else "")
        )
    out.append("\njobs:")
    for job, j in sorted(snap.jobs.items()):
        holder = j.get("lock_holder")
        out.append(
            f"  {terminal_safe(job):44} last {j.get('last_outcome', '-'):9}"
            f" lock {'held by ' + terminal_safe(holder) if holder else 'free'}"
            f"  skips {j.get('lock_skips', 0)}"
        )
    out.append("\nqueues: " + ", ".join(f"{q} {n}" for q, n in snap.queues.items()))
    out.append("workers online:")
    for queue, nodes in snap.workers.items():
        out.append(f"  {queue:14} {len(nodes)}  {terminal_safe(' '.join(nodes))}")
    out += render_clocks(snap)
    for problem in snap.problems:
        out.append(f"\n! {terminal_safe(problem)}")
    return "\n".join(out)


def to_json(snap: Snapshot) -> str:
    return json.dumps(asdict(snap), indent=2, default=str)


def add_commands(sub: Subparsers) -> None:
    status = sub.add_parser("status", help="backlog, throughput, failures, playlists, locks")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(handler=_status)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    snap = snapshot(settings)
    print(to_json(snap) if args.json else render(snap))
    return 1 if snap.problems else 0
