"""`bcfy status`, `bcfy status --json` and `bcfy metrics` against a pipeline in a known state:
calls in every stage and window, failures with their reasons, polls that failed, job runs with
their outcomes, a held lock, skipped and late ticks, queue depths and one worker online. Every
figure shown is checked against the state made here, not only its name.

Times are set relative to one reading of the database's clock (T0), far from the windows'
edges (5 minutes, 1 hour, 24 hours), so the figures do not depend on how long the test takes.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Services
from tests.support.procs import start_metrics, start_worker
from workers.core import clock
from workers.core.locks import SingletonLock, job_keys
from workers.core.rows import one_row
from workers.dev.procs import Proc, run_cli, wait_until
from workers.dev.services import free_port

pytestmark = pytest.mark.slow

POLL = "tasks.ingest.poll_followed_playlists"
AUDIO = "tasks.audio.process_pending_audio"
DISPATCH = "tasks.transcription.dispatch_ready_calls"
GEO = "tasks.geo.refresh_geo_data"
MAINTENANCE = "tasks.maintenance.prune_history"
ALPHA = uuid.UUID("0a0a0a0a-0000-4000-8000-00000000000a")
BRAVO = uuid.UUID("0b0b0b0b-0000-4000-8000-00000000000b")
HOLDER = "audio@ops-test-host:4242:0123456789ab"
MIN, HOUR = 60, 3600


@dataclass
class Known:
    alpha_last_poll: datetime
    worker: str  # the node online on the ingest queue


def _at(t0: datetime, ago_sec: float) -> datetime:
    return t0 - timedelta(seconds=ago_sec)


def build_state(services: Services) -> datetime:
    """The database and Redis as the expectations below describe; returns the last poll time
    of playlist Alpha."""
    with services.db() as conn:
        conn.execute(
            # history_totals and its checkpoints too: totals a maintenance run folded in an
            # earlier test would otherwise be added to this state's counts.
            "TRUNCATE bcfy_calls_raw, bcfy_playlists, bcfy_playlist_poll_log,"
            " bcfy_calls_quarantine, job_runs, history_totals, history_checkpoints CASCADE"
        )
        (t0,) = one_row(conn.execute("SELECT now()").fetchone())

        def call(created_ago: float) -> int:
            (call_id,) = one_row(
                conn.execute(
                    "INSERT INTO bcfy_calls_raw"
                    " (group_id, call_ts, started_at, url, raw, created_at)"
                    " VALUES ('1-100', %s, %s, %s, '{}', %s) RETURNING id",
                    (
                        int(_at(t0, created_ago).timestamp()),
                        _at(t0, created_ago),
                        f"https://calls.example/{uuid.uuid4().hex}.m4a",
                        _at(t0, created_ago),
                    ),
                ).fetchone()
            )
            return int(call_id)

        def audio(call_id: int, **cols: Any) -> None:
            sets = ", ".join(f"{k} = %({k})s" for k in cols)
            conn.execute(
                f"UPDATE call_audio SET {sets} WHERE call_id = %(id)s", cols | {"id": call_id}
            )

        def ready(call_id: int, ago: float) -> None:
            audio(call_id, state="ready", prepared_path="p.flac", ready_at=_at(t0, ago))

        def transcription(call_id: int, **cols: Any) -> None:
            sets = ", ".join(f"{k} = %({k})s" for k in cols)
            conn.execute(
                f"UPDATE call_transcription SET {sets} WHERE call_id = %(id)s",
                cols | {"id": call_id},
            )

        def transcript(call_id: int, ago: float, processing: float | None) -> None:
            conn.execute(
                "INSERT INTO transcripts (call_id, text, backend, model, processing_sec,"
                " created_at) VALUES (%s, 'engine twelve', 'pocketsphinx', 'test', %s, %s)",
                (call_id, processing, _at(t0, ago)),
            )
            transcription(call_id, state="done", due_at=None, finished_at=_at(t0, ago))

        def failed(call_id: int, ago: float, error: str) -> None:
            transcription(
                call_id, state="failed", due_at=None, finished_at=_at(t0, ago), last_error=error
            )

        # Audio pending (4) and downloading (2).
        for _ in range(4):
            call(60)
        for _ in range(2):
            c = call(90)
            audio(c, state="downloading", lease_owner="a1:x", lease_until=_at(t0, -300))
        # Audio failed: two in the last 5 minutes, one more in the hour, one within 24 hours,
        # one older than that.
        for _ in range(2):
            audio(
                call(120),
                state="failed",
                error_code="http_404",
                updated_at=_at(t0, 100),
                last_error="the audio server answered 404",
            )
        audio(
            call(40 * MIN),
            state="failed",
            updated_at=_at(t0, 30 * MIN),
            last_error="not audio: text/html\nthe body began with <html>",
        )
        audio(
            call(3 * HOUR + 60),
            state="failed",
            error_code="http_404",
            updated_at=_at(t0, 3 * HOUR),
            last_error="404",
        )
        audio(
            call(30 * HOUR),
            state="failed",
            error_code="too_large",
            updated_at=_at(t0, 30 * HOUR),
            last_error="too large",
        )
        # Transcribed: in the last 5 minutes after 10, 20 and 40 s (1, 2, 4 s recognising);
        # earlier in the hour after 100 s (recognition time unknown) and 200 s (50 s).
        processing: float | None  # (None below: recognition time unknown)
        for latency, processing in ((10, 1.0), (20, 2.0), (40, 4.0)):
            c = call(120 + latency)
            ready(c, 125)
            transcript(c, 120, processing)
        for latency, processing in ((100, None), (200, 50.0)):
            c = call(30 * MIN + latency)
            ready(c, 30 * MIN + 50)
            transcript(c, 30 * MIN, processing)
        # Transcription failed: 5 minutes, the hour, within 24 hours, older.
        error: str | None  # (None below: polls and job runs that succeeded)
        for created, ready_ago, failed_ago, error in (
            (200, 130, 100, "HTTP 401: bad key\nTraceback ..."),
            (2500, 40 * MIN, 30 * MIN, "audio missing: prepared/x.flac"),
            (3 * HOUR + 600, 3 * HOUR + 300, 3 * HOUR, "HTTP 401: bad key"),
            (31 * HOUR, 30 * HOUR + 60, 30 * HOUR, "an old failure"),
        ):
            c = call(created)
            ready(c, ready_ago)
            failed(c, failed_ago, error)
        # Transcription waiting (pending, dispatched) and running.
        ready(call(200), 130)
        c = call(200)
        ready(c, 130)
        transcription(c, state="dispatched", due_at=_at(t0, -600), dispatch_count=1)
        c = call(200)
        ready(c, 130)
        transcription(c, state="running", due_at=_at(t0, -600), attempts=1, claimed_by="w:1")

        # Two quarantined records.
        for reason in ("missing ts", "bad url"):
            conn.execute(
                "INSERT INTO bcfy_calls_quarantine (playlist_uuid, polled_at, reason, raw)"
                " VALUES (%s, %s, %s, '{}')",
                (ALPHA, _at(t0, 60), reason),
            )

        # Playlists and their polls: Alpha's last poll failed; Bravo never polled.
        conn.execute(
            "INSERT INTO bcfy_playlists (uuid, name, sync, cursor_pos)"
            " VALUES (%s, 'Alpha PD', true, 1700000100), (%s, 'Bravo Fire', false, NULL)",
            (ALPHA, BRAVO),
        )
        polls = [
            (60, False, "HTTP 500: upstream down", 500, 0),
            (120, False, "HTTP 500: upstream down", 500, 0),
            (10 * MIN, True, None, 200, 3),
            (30 * MIN, False, "timeout reading the answer\nafter 10 s", None, 0),
            (2 * HOUR, True, None, 200, 1),
            (3 * HOUR, False, "HTTP 500: upstream down", 500, 0),
            (30 * HOUR, False, "an old error", 500, 0),
        ]
        for ago, success, error, status, new in polls:
            conn.execute(
                "INSERT INTO bcfy_playlist_poll_log (playlist_uuid, poll_started_at, success,"
                " error, http_status, calls_new) VALUES (%s, %s, %s, %s, %s, %s)",
                (ALPHA, _at(t0, ago), success, error, status, new),
            )

        # Job runs: the last of each job's decides its outcome.
        runs = [
            (POLL, 300, 299, "ok", None),
            (POLL, 200, 199, "ok", None),
            (POLL, 100, 99, "ok", None),
            (POLL, 30, 28, "error", "HTTP 500 boom"),
            (AUDIO, 60, 59, "ok", None),
            (AUDIO, 20, 20, "skipped", None),
            (AUDIO, 10, 9.5, "ok", None),
            (DISPATCH, 15, 14, "lost_lock", "lock taken"),
        ]
        for job, started, ended, outcome, error in runs:
            conn.execute(
                "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome, error)"
                " VALUES (%s, 'w@h', %s, %s, %s, %s)",
                (job, _at(t0, started), _at(t0, ended), outcome, error),
            )

    client = services.redis()
    try:
        # The audio job's lock held (for long enough) and two runs skipped because of it.
        assert SingletonLock(client, AUDIO, ttl=600, token=HOLDER).acquire()
        for _ in range(2):
            assert not SingletonLock(client, AUDIO, ttl=600).acquire()
        client.set(job_keys(POLL)[4], 3)  # three late ticks dropped
        client.rpush("audio", *[f"m{i}" for i in range(3)])
        client.rpush("transcription", *[f"m{i}" for i in range(5)])
        clock.report(client, "beat", "beat@ops-host", clock.Reading(1.5, 0.001, 0))
    finally:
        client.close()
    return _at(t0, 60)


@pytest.fixture
def known(clean: Services, procs: list[Proc], tmp_path: Path) -> Iterator[Known]:
    """The known state, with one worker consuming the ingest queue (which is left empty)."""
    last_poll = build_state(clean)
    procs.append(start_worker("ops", clean.worker_env(tmp_path), tmp_path, queues="ingest"))
    yield Known(alpha_last_poll=last_poll, worker=f"ops@{socket.gethostname()}")
    client = clean.redis()
    client.delete("audio", "transcription")
    client.close()


class StageJson(TypedDict):
    """A stage as `bcfy status --json` prints it (workers/cli/status.py's Stage)."""

    backlog: int
    in_flight: int
    done: dict[str, int]
    failed: dict[str, int]
    failed_total: int
    top_failures: list[list[Any]]  # [reason, calls]: JSON has no tuples


def stage(
    backlog: int,
    in_flight: int,
    done: tuple[int, int],
    failed: tuple[int, int],
    failed_total: int,
    top_failures: list[list[Any]],
) -> StageJson:
    """A stage's counts as `bcfy status --json` shows them: done and failed in the last 5
    minutes and in the last hour."""
    return {
        "backlog": backlog,
        "in_flight": in_flight,
        "done": {"5m": done[0], "1h": done[1]},
        "failed": {"5m": failed[0], "1h": failed[1]},
        "failed_total": failed_total,
        "top_failures": top_failures,
    }


EXPECTED_STAGES: dict[str, StageJson] = {
    # backlog, in flight, done (5m, 1h), failed (5m, 1h), failed total; top failures (24 h).
    # ingest: failed polls in the windows, quarantined records in the total.
    "ingest": stage(
        0,
        0,
        (15, 19),
        (2, 3),
        2,
        [["HTTP 500: upstream down", 3], ["timeout reading the answer", 1]],
    ),
    "audio": stage(4, 2, (7, 10), (2, 3), 5, [["http_404", 3], ["not audio: text/html", 1]]),
    "transcription": stage(
        2, 1, (3, 5), (1, 2), 4, [["HTTP 401: bad key", 2], ["audio missing: prepared/x.flac", 1]]
    ),
}
# percentile_cont over 10, 20, 40 s (minus 1, 2, 4 s of recognition), and with 100 and 200 s
# (minus 0 and 50 s) for the hour.
EXPECTED_LATENCY = {
    "5m": {"p50": 20.0, "p95": 38.0, "p95_excluding_recognition": 34.2, "calls": 3},
    "1h": {"p50": 40.0, "p95": 180.0, "p95_excluding_recognition": 140.0, "calls": 5},
}
EXPECTED_TOTALS = {
    "ingest": {"done": 23, "failed": 2},
    "audio": {"done": 12, "failed": 5},
    "transcription": {"done": 5, "failed": 4},
    "polls": {"ok": 2, "error": 5},
}
EXPECTED_RUNS = {
    POLL: {"ok": 3, "error": 1},
    AUDIO: {"ok": 2, "skipped": 1},
    DISPATCH: {"lost_lock": 1},
}
EXPECTED_QUEUES = {"ingest": 0, "audio": 3, "transcription": 5}


def status_json(env: dict[str, str], worker: str) -> dict[str, Any]:
    """`bcfy status --json`, once the worker answers its inspection (it is given a second;
    a loaded machine can miss that, so ask again)."""

    def read() -> dict[str, Any] | None:
        out = run_cli("status", "--json", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        snap = json.loads(out.stdout)
        return snap if snap["workers"]["ingest"] == [worker] else None

    return wait_until(read, 60, "the worker online in `bcfy status --json`", every=0.5)


def test_status_json_shows_every_figure_of_a_known_state(known: Known, clean: Services, tmp_path):
    snap = status_json(clean.worker_env(tmp_path), known.worker)

    assert snap["problems"] == []
    assert snap["stages"] == EXPECTED_STAGES
    assert snap["latency_sec"].keys() == EXPECTED_LATENCY.keys()
    for window, expected in EXPECTED_LATENCY.items():
        got = snap["latency_sec"][window]
        assert got["calls"] == expected["calls"], window
        for key in ("p50", "p95", "p95_excluding_recognition"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (window, key)
    alpha_polled = datetime.fromisoformat(snap["playlists"][0]["last_poll_at"])
    assert alpha_polled == known.alpha_last_poll
    assert snap["playlists"] == [
        {
            "uuid": str(ALPHA),
            "name": "Alpha PD",
            "sync": True,
            "cursor": 1700000100,
            "last_poll_at": snap["playlists"][0]["last_poll_at"],
            "last_poll_ok": False,
            "last_poll_new_calls": 0,
            "last_poll_http_status": 500,
            "last_poll_error": "HTTP 500: upstream down",
        },
        {
            "uuid": str(BRAVO),
            "name": "Bravo Fire",
            "sync": False,
            "cursor": None,
            "last_poll_at": None,
            "last_poll_ok": None,
            "last_poll_new_calls": None,
            "last_poll_http_status": None,
            "last_poll_error": None,
        },
    ]
    jobs = snap["jobs"]
    assert set(jobs) == {POLL, AUDIO, DISPATCH, GEO, MAINTENANCE}
    expected_last = {
        POLL: ("error", 2.0, "HTTP 500 boom"),
        AUDIO: ("ok", 0.5, None),
        DISPATCH: ("lost_lock", 1.0, "lock taken"),
    }
    for job, (outcome, duration, error) in expected_last.items():
        assert (jobs[job]["last_outcome"], jobs[job]["last_error"]) == (outcome, error), job
        assert jobs[job]["last_duration_sec"] == pytest.approx(duration), job
    for never_ran in (GEO, MAINTENANCE):
        assert "last_outcome" not in jobs[never_ran], "a job that never ran has no last outcome"
    assert {job: j["lock_holder"] for job, j in jobs.items()} == {
        POLL: None,
        AUDIO: HOLDER,
        DISPATCH: None,
        GEO: None,
        MAINTENANCE: None,
    }
    assert {job: j["lock_skips"] for job, j in jobs.items()} == {
        POLL: 0,
        AUDIO: 2,
        DISPATCH: 0,
        GEO: 0,
        MAINTENANCE: 0,
    }
    assert {job: j["late_ticks"] for job, j in jobs.items()} == {
        POLL: 3,
        AUDIO: 0,
        DISPATCH: 0,
        GEO: 0,
        MAINTENANCE: 0,
    }
    assert snap["queues"] == EXPECTED_QUEUES
    assert snap["workers"] == {"ingest": [known.worker], "audio": [], "transcription": []}
    assert snap["clocks"]["beat@ops-host"]["offset_sec"] == 1.5
    assert snap["clocks"]["beat@ops-host"]["kind"] == "beat"


def _lines_after(lines: list[str], heading: str, n: int) -> list[list[str]]:
    at = lines.index(heading)
    return [line.split() for line in lines[at + 1 : at + 1 + n]]


def test_status_text_prints_every_figure_of_a_known_state(known: Known, clean: Services, tmp_path):
    env = clean.worker_env(tmp_path)
    status_json(env, known.worker)  # the worker answers inspections by now
    out = run_cli("status", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()

    table = {line.split()[0]: line.split()[1:] for line in lines[3:6]}
    assert lines[2].split() == [
        "stage",
        "backlog",
        "working",
        "done",
        "5m",
        "done",
        "1h",
        "failed",
        "5m",
        "failed",
        "1h",
    ]
    for name, st in EXPECTED_STAGES.items():
        figures = [
            st["backlog"],
            st["in_flight"],
            st["done"]["5m"],
            st["done"]["1h"],
            st["failed"]["5m"],
            st["failed"]["1h"],
        ]
        assert table[name] == [str(n) for n in figures], name
        top = _lines_after(lines, f"top {name} failures (24 h):", 3)
        assert top[:2] == [[str(n), *reason.split()] for reason, n in st["top_failures"]], name
        assert top[2] == [], f"{name}: only the reasons there are"

    assert "quarantined records: 2" in lines
    assert (
        "call to transcript (5m, 3 calls): p50 20.0s  p95 38.0s  p95 without recognition 34.2s"
        in lines
    )
    assert (
        "call to transcript (1h, 5 calls): p50 40.0s  p95 180.0s  p95 without recognition 140.0s"
        in lines
    )
    alpha, bravo = _lines_after(lines, "playlists:", 2)
    assert datetime.fromisoformat(alpha[7]) == known.alpha_last_poll
    assert [alpha, bravo] == [
        [
            str(ALPHA),
            "Alpha",
            "PD",
            "sync=on",
            "cursor=1700000100",
            "last",
            "poll",
            alpha[7],
            "FAILED:",
            "HTTP",
            "500:",
            "upstream",
            "down",
        ],
        [
            str(BRAVO),
            "Bravo",
            "Fire",
            "sync=off",
            "cursor=None",
            "last",
            "poll",
            "-",
            "never",
            "polled",
        ],
    ]
    jobs = {row[0]: row[1:] for row in _lines_after(lines, "jobs:", 5)}
    assert jobs == {
        AUDIO: ["last", "ok", "lock", "held", "by", HOLDER, "skips", "2"],
        GEO: ["last", "-", "lock", "free", "skips", "0"],
        MAINTENANCE: ["last", "-", "lock", "free", "skips", "0"],
        POLL: ["last", "error", "lock", "free", "skips", "0"],
        DISPATCH: ["last", "lost_lock", "lock", "free", "skips", "0"],
    }
    assert "queues: ingest 0, audio 3, transcription 5" in lines
    assert _lines_after(lines, "workers online:", 3) == [
        ["ingest", "1", known.worker],
        ["audio", "0"],
        ["transcription", "0"],
    ]
    clocks = {
        row[1]: row
        for row in _lines_after(lines, "clocks (offset from Redis's clock; + ahead):", 5)
        if row
    }
    assert clocks["beat@ops-host"][:3] == ["beat", "beat@ops-host", "+1.5s"]
    assert f"late ticks dropped (waited longer than JOB_MISFIRE_GRACE_SEC): {POLL} 3" in lines
    assert not any(line.startswith("! ") for line in lines), "no part unreachable"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """The page's samples: (name, labels) -> value."""
    text = httpx.get(url, timeout=60).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_values_of_a_known_state(known: Known, clean: Services, tmp_path, procs):
    port = free_port()
    env = clean.worker_env(tmp_path, METRICS_CACHE_SEC="0")
    url = start_metrics(env, tmp_path, procs, port)

    def with_worker() -> Samples | None:
        page = scrape(url)
        return page if page.get(("bcfy_workers_online", frozenset({("queue", "ingest")}))) else None

    page = wait_until(with_worker, 60, "a scrape with the worker online", every=0.5)

    def value(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in page, f"{name}{labels} not on the page"
        return page[key]

    for stage, st in EXPECTED_STAGES.items():
        assert value("bcfy_stage_backlog", stage=stage) == st["backlog"], stage
        assert value("bcfy_stage_in_flight", stage=stage) == st["in_flight"], stage
        assert value("bcfy_stage_done_total", stage=stage) == EXPECTED_TOTALS[stage]["done"]
        assert value("bcfy_stage_failed_total", stage=stage) == EXPECTED_TOTALS[stage]["failed"]
    assert value("bcfy_polls_total", outcome="ok") == 2
    assert value("bcfy_polls_total", outcome="error") == 5
    assert value("bcfy_quarantined_records_total") == 2
    for job, skips, held in (
        (POLL, 0, 0),
        (AUDIO, 2, 1),
        (DISPATCH, 0, 0),
        (GEO, 0, 0),
        (MAINTENANCE, 0, 0),
    ):
        assert value("bcfy_lock_skips_total", job=job) == skips, job
        assert value("bcfy_lock_held", job=job) == held, job
    runs = {
        (dict(labels)["job"], dict(labels)["outcome"]): v
        for (name, labels), v in page.items()
        if name == "bcfy_job_runs_total"
    }
    assert runs == {(j, o): n for j, by in EXPECTED_RUNS.items() for o, n in by.items()}
    for queue, depth in EXPECTED_QUEUES.items():
        assert value("bcfy_queue_depth", queue=queue) == depth, queue
    assert value("bcfy_workers_online", queue="ingest") == 1
    assert value("bcfy_workers_online", queue="audio") == 0
    assert value("bcfy_workers_online", queue="transcription") == 0
    for window, lat in EXPECTED_LATENCY.items():
        for quantile, recognition, key in (
            ("0.5", "included", "p50"),
            ("0.95", "included", "p95"),
            ("0.95", "excluded", "p95_excluding_recognition"),
        ):
            got = value(
                "bcfy_call_to_transcript_seconds",
                window=window,
                quantile=quantile,
                recognition=recognition,
            )
            assert got == pytest.approx(lat[key], abs=1e-6), (window, key)
    assert value("bcfy_scrape_ok") == 1
    assert value("bcfy_scrape_seconds") > 0
    assert value("bcfy_scrape_age_seconds") >= 0


def test_status_exits_1_when_redis_and_the_workers_cannot_be_read_and_shows_the_rest(
    clean: Services, tmp_path
):
    build_state(clean)
    env = clean.worker_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")

    out = run_cli("status", "--json", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    snap = json.loads(out.stdout)
    assert [p.split(":")[0] for p in snap["problems"]] == [
        "redis unavailable",
        "workers unavailable",
    ]
    # What PostgreSQL holds is still shown, figure for figure.
    assert snap["stages"] == EXPECTED_STAGES
    assert [p["name"] for p in snap["playlists"]] == ["Alpha PD", "Bravo Fire"]
    assert snap["jobs"][POLL]["last_outcome"] == "error"
    assert snap["queues"] == {} and snap["workers"] == {}

    text = run_cli("status", env=env)
    assert text.returncode == 1, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("! ")] == [
        "! redis unavailable",
        "! workers unavailable",
    ]
    assert lines[4].split() == ["audio", "4", "2", "7", "10", "2", "3"]
