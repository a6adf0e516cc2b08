"""Retention: the maintenance job prunes each kind of history after its own setting, removes audio
files with their rows (none left without a row, no row pointing to a missing file, also across
a crash), keeps what is set to be kept, works in batches within its time budget, keeps the
metrics counters whole, and runs as a singleton from beat. Real PostgreSQL, real files."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beat_schedule import JOBS_BY_NAME
from tests.conftest import Services
from tests.support.procs import start_beat, start_worker
from workers.app import app
from workers.cli.status import totals
from workers.core.locks import SingletonLock
from workers.core.rows import one_row
from workers.core.runtime import Runtime
from workers.core.settings import (
    Settings,
    SettingsError,
    env_fields,
    get_settings,
    load_settings,
)
from workers.dev.calls import insert_call
from workers.dev.procs import wait_until

JOB = "tasks.maintenance.prune_history"
RETENTION_VARS = (
    "RETENTION_JOB_RUNS_DAYS",
    "RETENTION_POLL_LOG_DAYS",
    "RETENTION_AUDIO_ATTEMPTS_DAYS",
    "RETENTION_QUARANTINE_DAYS",
    "RETENTION_ORIGINAL_AUDIO_DAYS",
    "RETENTION_PREPARED_AUDIO_DAYS",
    "RETENTION_CALLS_DAYS",
    "RETENTION_TRANSCRIPTS_DAYS",
    "MAINTENANCE_INTERVAL_SEC",
    "RETENTION_BATCH_SIZE",
    "RETENTION_BATCH_PAUSE_SEC",
)
HISTORY = (
    "bcfy_playlist_poll_log, bcfy_calls_quarantine, history_totals, history_checkpoints,"
    " audio_file_trash"
)


@pytest.fixture
def hist(db: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """The db fixture (no calls, no job runs) with the other history tables empty too."""
    db.execute(f"TRUNCATE {HISTORY}")
    yield db


def ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return get_settings().with_values(AUDIO_STORE_DIR=str(tmp_path / "store"), **overrides)


def maintain(s: Settings, **kwargs: Any):
    from tasks.maintenance.jobs import run_maintenance

    return Runtime.current().run(run_maintenance(s, **kwargs))


# --- history rows --------------------------------------------------------------------------


def job_run(conn: psycopg.Connection, days: float, job: str = "tasks.x", outcome: str = "ok"):
    at = ago(days)
    conn.execute(
        "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome)"
        " VALUES (%s, 'w', %s, %s, %s)",
        (job, at, at + timedelta(seconds=1), outcome),
    )


def poll(conn: psycopg.Connection, days: float, success: bool = True) -> None:
    conn.execute(
        "INSERT INTO bcfy_playlist_poll_log (playlist_uuid, poll_started_at, success)"
        " VALUES (%s, %s, %s)",
        (uuid.UUID(int=1), ago(days), success),
    )


def quarantined(conn: psycopg.Connection, days: float) -> None:
    conn.execute(
        "INSERT INTO bcfy_calls_quarantine (polled_at, reason, raw, created_at)"
        " VALUES (%s, 'bad', '{}', %s)",
        (ago(days), ago(days)),
    )


def call(
    conn: psycopg.Connection,
    store: Path,
    days: float,
    *,
    ready_days: float | None = None,
    transcribed_days: float | None = None,
) -> int:
    """A call `days` old; with ready_days, its audio ready then with both files on disk; with
    transcribed_days, its transcript made then."""
    call_id = insert_call(conn, f"https://calls.example/{uuid.uuid4()}.m4a", 5.0)
    conn.execute(
        "UPDATE bcfy_calls_raw SET started_at = %s, created_at = %s WHERE id = %s",
        (ago(days), ago(days), call_id),
    )
    if ready_days is None:
        return call_id
    keys = {"original": f"p/{call_id}.m4a", "prepared": f"p/{call_id}.16k.flac"}
    for kind, key in keys.items():
        (store / key).parent.mkdir(parents=True, exist_ok=True)
        (store / key).write_bytes(f"{kind} {call_id}".encode())
    conn.execute(
        "UPDATE call_audio SET state = 'ready', original_path = %s, prepared_path = %s,"
        " ready_at = %s WHERE call_id = %s",
        (keys["original"], keys["prepared"], ago(ready_days), call_id),
    )
    conn.execute(
        "INSERT INTO call_audio_attempts (call_id, attempt, lease_owner, worker, started_at,"
        " ended_at, outcome) VALUES (%s, 1, 'o', 'w', %s, %s, 'ready')",
        (call_id, ago(ready_days), ago(ready_days)),
    )
    if transcribed_days is not None:
        conn.execute(
            "UPDATE call_transcription SET state = 'done', due_at = NULL, finished_at = %s"
            " WHERE call_id = %s",
            (ago(transcribed_days), call_id),
        )
        conn.execute(
            "INSERT INTO transcripts (call_id, text, backend, model, created_at)"
            " VALUES (%s, 'unit one', 'test', 'test', %s)",
            (call_id, ago(transcribed_days)),
        )
    return call_id


def count(conn: psycopg.Connection, table: str) -> int:
    (n,) = one_row(conn.execute(f"SELECT count(*) FROM {table}").fetchone())
    return int(n)


def files_of(conn: psycopg.Connection) -> dict[int, tuple[str | None, str | None]]:
    rows = conn.execute("SELECT call_id, original_path, prepared_path FROM call_audio")
    return {r[0]: (r[1], r[2]) for r in rows}


def assert_files_match_rows(conn: psycopg.Connection, store: Path) -> None:
    """Every path a row names is on disk, and every file on disk is named by a row."""
    named = {k for pair in files_of(conn).values() for k in pair if k}
    on_disk = {
        str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and ".tmp" not in p.parts
    }
    assert named - on_disk == set(), "rows pointing to missing files"
    assert on_disk - named == set(), "files no row names"
    assert count(conn, "audio_file_trash") == 0


# --- each kind after its own setting --------------------------------------------------------


def test_each_kind_is_pruned_after_its_setting_and_newer_rows_are_kept(hist, tmp_path):
    s = settings_for(tmp_path)  # the defaults: 14, 14, 30, 90, 7, 30 days; calls kept
    store = tmp_path / "store"
    for days in (15, 13):
        job_run(hist, days)
        poll(hist, days)
    for days in (91, 89):
        quarantined(hist, days)
    old = call(hist, store, 400, ready_days=400, transcribed_days=399)  # attempts 400 days old
    recent = call(hist, store, 20, ready_days=20, transcribed_days=20)  # original > 7 days
    fresh = call(hist, store, 1, ready_days=1, transcribed_days=1)

    report = maintain(s)

    assert [
        r[0] for r in hist.execute("SELECT started_at < now() - interval '14 days' FROM job_runs")
    ] == [False]
    assert count(hist, "bcfy_playlist_poll_log") == 1
    assert count(hist, "bcfy_calls_quarantine") == 1
    attempts = [r[0] for r in hist.execute("SELECT call_id FROM call_audio_attempts")]
    assert sorted(attempts) == sorted([recent, fresh])
    files = files_of(hist)
    assert files[old] == (None, None)
    assert files[recent] == (None, f"p/{recent}.16k.flac")
    assert files[fresh] == (f"p/{fresh}.m4a", f"p/{fresh}.16k.flac")
    # Calls and transcripts are kept unless set.
    assert count(hist, "bcfy_calls_raw") == 3 and count(hist, "transcripts") == 3
    assert report.pruned == {
        "original_audio": 2,
        "prepared_audio": 1,
        "audio_attempts": 1,
        "quarantine": 1,
        "poll_log": 1,
        "job_runs": 1,
    }
    assert report.files_removed == 3
    assert_files_match_rows(hist, store)
    pruned = hist.execute(
        "SELECT original_pruned_at IS NOT NULL, prepared_pruned_at IS NOT NULL"
        " FROM call_audio WHERE call_id = %s",
        (old,),
    ).fetchone()
    assert pruned == (True, True)


def test_prepared_audio_is_kept_until_its_transcription_finishes(hist, tmp_path):
    s = settings_for(tmp_path)
    store = tmp_path / "store"
    waiting = call(hist, store, 60, ready_days=60)  # transcription still pending
    maintain(s)
    assert files_of(hist)[waiting] == (None, f"p/{waiting}.16k.flac")
    assert_files_match_rows(hist, store)


def test_zero_keeps_every_kind_for_ever(hist, tmp_path):
    keep = {f.metadata["env"]: 0.0 for group, f in env_fields() if group == "retention"}
    keep |= {"RETENTION_BATCH_SIZE": 100, "RETENTION_BATCH_PAUSE_SEC": 0.0}
    s = settings_for(tmp_path, **keep)
    store = tmp_path / "store"
    job_run(hist, 900)
    poll(hist, 900)
    quarantined(hist, 900)
    old = call(hist, store, 900, ready_days=900, transcribed_days=900)
    report = maintain(s)
    assert report.pruned == {}
    assert count(hist, "job_runs") == count(hist, "bcfy_playlist_poll_log") == 1
    assert count(hist, "bcfy_calls_quarantine") == count(hist, "call_audio_attempts") == 1
    assert count(hist, "transcripts") == count(hist, "bcfy_calls_raw") == 1
    assert files_of(hist)[old] == (f"p/{old}.m4a", f"p/{old}.16k.flac")
    assert_files_match_rows(hist, store)


def test_calls_when_set_go_with_their_files_audio_rows_and_transcripts(hist, tmp_path):
    s = settings_for(tmp_path, RETENTION_CALLS_DAYS=180.0, RETENTION_TRANSCRIPTS_DAYS=180.0)
    store = tmp_path / "store"
    # Files kept for ever, so that the call's deletion is what has to remove them.
    s = s.with_values(RETENTION_ORIGINAL_AUDIO_DAYS=0.0, RETENTION_PREPARED_AUDIO_DAYS=0.0)
    old = call(hist, store, 200, ready_days=200, transcribed_days=200)
    kept = call(hist, store, 100, ready_days=100, transcribed_days=100)
    report = maintain(s)
    assert [r[0] for r in hist.execute("SELECT id FROM bcfy_calls_raw")] == [kept]
    assert count(hist, f"call_audio_attempts WHERE call_id = {old}") == 0
    for table in ("call_audio", "call_transcription", "transcripts"):
        assert [r[0] for r in hist.execute(f"SELECT call_id FROM {table}")] == [kept], table
    assert report.pruned["calls"] == 1 and report.files_removed == 2
    assert not (store / f"p/{old}.m4a").exists()
    assert_files_match_rows(hist, store)


def test_transcripts_when_set_go_and_the_calls_stay(hist, tmp_path):
    s = settings_for(tmp_path, RETENTION_TRANSCRIPTS_DAYS=60.0)
    store = tmp_path / "store"
    old = call(hist, store, 100, ready_days=100, transcribed_days=100)
    new = call(hist, store, 10, ready_days=10, transcribed_days=10)
    maintain(s)
    assert [r[0] for r in hist.execute("SELECT call_id FROM transcripts")] == [new]
    assert count(hist, "bcfy_calls_raw") == 2 and old


# --- files across a crash -------------------------------------------------------------------


def test_a_crash_after_the_commit_leaves_only_listed_files_which_the_next_run_removes(
    hist, tmp_path, monkeypatch
):
    from tasks.maintenance import trash

    s = settings_for(tmp_path)
    store = tmp_path / "store"
    ids = [call(hist, store, 50, ready_days=50, transcribed_days=50) for _ in range(3)]
    # One file already gone by hand: that must not stop anything.
    (store / f"p/{ids[0]}.m4a").unlink()

    def crash(run: Any, keys: list[str]) -> int:
        raise SystemExit("worker killed between the commit and the file removal")

    monkeypatch.setattr(trash, "_remove", crash)
    with pytest.raises(SystemExit):
        maintain(s)
    # The first batch's rows already say their files are gone; the files wait, listed, for
    # the next run. Nothing after the crash point was decided.
    assert files_of(hist) == {i: (None, f"p/{i}.16k.flac") for i in ids}
    listed = {r[0] for r in hist.execute("SELECT key FROM audio_file_trash")}
    assert listed == {f"p/{i}.m4a" for i in ids}
    assert (store / f"p/{ids[1]}.m4a").exists()

    monkeypatch.undo()
    report = maintain(s)
    assert report.files_removed == 5  # six listed, one of them already gone
    assert_files_match_rows(hist, store)


def test_a_listed_file_a_row_names_again_is_kept(hist, tmp_path):
    s = settings_for(tmp_path)
    store = tmp_path / "store"
    live = call(hist, store, 1, ready_days=1)
    hist.execute(
        "INSERT INTO audio_file_trash (key, call_id) VALUES (%s, %s)", (f"p/{live}.m4a", live)
    )
    maintain(s)
    assert (store / f"p/{live}.m4a").exists()
    assert_files_match_rows(hist, store)


# --- batches, budget, counters --------------------------------------------------------------


def test_a_large_table_is_pruned_completely_in_small_batches(hist, tmp_path, monkeypatch):
    from tasks.maintenance import rows

    hist.execute(
        "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome)"
        " SELECT 'tasks.x', 'w', now() - interval '20 days' - i * interval '1 second',"
        "        now() - interval '20 days', 'ok' FROM generate_series(1, 1000) i"
    )
    job_run(hist, 1)
    batches: list[int] = []
    real = rows._prune_batch

    async def spy(run: Any, p: Any, cutoff: datetime) -> int:
        n = await real(run, p, cutoff)
        if p.kind == "job_runs":
            batches.append(n)
        return n

    monkeypatch.setattr(rows, "_prune_batch", spy)
    s = settings_for(tmp_path, RETENTION_BATCH_SIZE=64, RETENTION_BATCH_PAUSE_SEC=0.0)
    maintain(s)
    assert count(hist, "job_runs") == 1
    assert batches[:-1] == [64] * 15 and batches[-1] == 1000 - 15 * 64


def test_a_run_stops_at_its_budget_and_the_next_one_finishes(hist, tmp_path):
    hist.execute(
        "INSERT INTO job_runs (job, worker, started_at, ended_at, outcome)"
        " SELECT 'tasks.x', 'w', now() - interval '20 days', now() - interval '20 days', 'ok'"
        "   FROM generate_series(1, 300)"
    )
    s = settings_for(tmp_path, RETENTION_BATCH_SIZE=10, RETENTION_BATCH_PAUSE_SEC=0.0)
    spent = maintain(s, deadline=time.monotonic())
    assert spent.out_of_time and count(hist, "job_runs") == 300
    assert not maintain(s).out_of_time
    assert count(hist, "job_runs") == 0


def test_the_metrics_counters_do_not_drop_when_history_is_pruned(hist, tmp_path):
    s = settings_for(tmp_path)
    store = tmp_path / "store"
    for days in (30, 20, 2, 0.001):
        job_run(hist, days, outcome="ok")
        job_run(hist, days, job="tasks.y", outcome="error")
        poll(hist, days, success=days > 10)
        quarantined(hist, days * 10)
        call(hist, store, days, ready_days=days, transcribed_days=days)

    def counted() -> tuple[dict, dict]:
        from workers.cli.status import counters

        with psycopg.connect(hist.info.dsn) as conn:
            runs = {k: n for k, n in counters(conn).items() if k[0] == "job_runs"}
            return totals(conn), runs

    before = counted()
    assert before[0]["polls"] == {"ok": 2, "error": 2}
    report = maintain(s)
    assert report.pruned["job_runs"] == 4 and report.pruned["poll_log"] == 2
    assert counted() == before
    job_run(hist, 0)
    _, runs = counted()
    assert runs[("job_runs", "tasks.x", "ok")] == 5


# --- settings and scheduling ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(var=st.sampled_from(RETENTION_VARS), raw=st.text(max_size=12))
def test_retention_settings_are_non_negative_numbers_or_refused_by_name(var, raw):
    try:
        s = load_settings({var: raw})
    except SettingsError as exc:
        assert var in str(exc)
        return
    value = s.value(var)
    assert value >= 0 and value == value and value != float("inf")


@pytest.mark.parametrize("raw", ["-1", "-0.5", "nan", "inf", "two weeks"])
def test_a_negative_or_non_numeric_retention_names_its_variable(raw):
    with pytest.raises(SettingsError, match="RETENTION_POLL_LOG_DAYS"):
        load_settings({"RETENTION_POLL_LOG_DAYS": raw})


def test_deleting_calls_while_keeping_their_transcripts_is_refused():
    with pytest.raises(SettingsError, match=r"RETENTION_CALLS_DAYS.*RETENTION_TRANSCRIPTS_DAYS"):
        load_settings({"RETENTION_CALLS_DAYS": "30"})
    with pytest.raises(SettingsError, match="RETENTION_TRANSCRIPTS_DAYS"):
        load_settings({"RETENTION_CALLS_DAYS": "30", "RETENTION_TRANSCRIPTS_DAYS": "60"})
    s = load_settings({"RETENTION_CALLS_DAYS": "30", "RETENTION_TRANSCRIPTS_DAYS": "30"})
    assert (s.retention.calls_days, s.retention.transcripts_days) == (30, 30)
    assert load_settings({"RETENTION_CALLS_DAYS": ""}).retention.calls_days == 0


def test_maintenance_is_a_beat_job_on_the_ingest_queue():
    job = JOBS_BY_NAME[JOB]
    assert (job.entry, job.interval_setting, job.queue) == (
        "maintenance",
        "MAINTENANCE_INTERVAL_SEC",
        "ingest",
    )
    assert app.conf.beat_schedule["maintenance"]["task"] == JOB
    assert app.amqp.router.route({}, JOB)["queue"].name == "ingest"
    assert get_settings().jobs.maintenance_interval_sec == 3600


@pytest.mark.slow
def test_beat_runs_maintenance_as_a_singleton(clean: Services, hist, procs, tmp_path):
    job_run(hist, 30)
    env = clean.worker_env(
        tmp_path,
        MAINTENANCE_INTERVAL_SEC="2",
        AUDIO_STORE_DIR=str(tmp_path / "store"),
        LOCK_TTL_SEC="3",
        LOCK_RENEW_SEC="1",
    )
    # Another holder has the job's lock: beat's ticks are skipped, as for every singleton.
    holder = SingletonLock(clean.redis(), JOB, ttl=60, renew_every=20, token="elsewhere:1")
    assert holder.acquire()
    procs.append(start_worker("w1", env, tmp_path, queues="ingest"))
    procs.append(start_beat("beat", env, tmp_path, app="workers.app"))
    wait_until(lambda: clean.job_runs(JOB, "skipped"), 60, "a skipped maintenance run")
    assert "already running, held by elsewhere:1" in clean.job_runs(JOB, "skipped")[0].error
    assert count(hist, "job_runs WHERE started_at < now() - interval '14 days'") == 1
    holder.release()
    wait_until(lambda: clean.job_runs(JOB, "ok"), 60, "a maintenance run")
    assert count(hist, "job_runs WHERE started_at < now() - interval '14 days'") == 0
    log = "".join(p.log() for p in procs)
    assert "maintenance: pruned job_runs 1" in log
    assert json.dumps(clean.job_runs(JOB, "error"), default=str) == "[]"
