"""Each job is declared once (beat_schedule.JOBS); the app's routes, beat's schedule, the time
limits and `bcfy status`'s job list come from that declaration and from the settings, which
are read when a process starts, not when a module is imported."""

from __future__ import annotations

import json
import subprocess
import sys

from workers.dev.procs import ROOT

# What the app looks like from a fresh process: every task with its queue and time limits, and
# beat's schedule. Run in a subprocess: the app is configured once per process.
PROBE = """
import json
from workers.app import app
app.loader.import_default_modules()
app.finalize()
tasks = {
    name: [app.amqp.router.route({}, name)["queue"].name, t.soft_time_limit, t.time_limit]
    for name, t in app.tasks.items() if not name.startswith("celery.")
}
beat = {
    entry: [e["task"], e["schedule"].total_seconds(), e["options"]["headers"]]
    for entry, e in app.conf.beat_schedule.items()
}
print(json.dumps({"tasks": tasks, "beat": beat}))
"""


def probe(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    printed: dict = json.loads(out.stdout)
    return printed


def test_every_task_is_declared_once_and_routed_to_its_declared_queue():
    from beat_schedule import JOBS, QUEUES

    names = [job.name for job in JOBS]
    assert len(names) == len(set(names))
    app = probe({})
    assert set(app["tasks"]) == set(names), "a registered task is not declared in JOBS, or back"
    for job in JOBS:
        assert job.queue in QUEUES
        assert app["tasks"][job.name][0] == job.queue, job.name


def test_the_queues_are_the_documented_ones():
    app = probe({})
    queues = {name: queue for name, (queue, _soft, _hard) in app["tasks"].items()}
    assert queues == {
        "tasks.ingest.poll_followed_playlists": "ingest",
        "tasks.ingest.backfill_gaps": "ingest",
        "tasks.audio.process_pending_audio": "audio",
        "tasks.audio.prepare_calls": "audio",
        "tasks.transcription.dispatch_ready_calls": "ingest",
        "tasks.transcription.transcribe_call": "transcription",
        "tasks.geo.refresh_geo_data": "ingest",
        "tasks.maintenance.prune_history": "ingest",
    }


def test_every_periodic_job_has_a_beat_entry_from_its_settings():
    from beat_schedule import JOBS

    env = {
        "INGEST_INTERVAL_SEC": "17",
        "AUDIO_WORKER_INTERVAL_SEC": "3",
        "TRANSCRIPTION_DISPATCH_INTERVAL_SEC": "40",
        "GEO_REFRESH_INTERVAL_SEC": "7200",
        "MAINTENANCE_INTERVAL_SEC": "600",
        "JOB_MISFIRE_GRACE_SEC": "12",
    }
    beat = probe(env)["beat"]
    periodic = [job for job in JOBS if job.entry]
    assert {job.entry for job in periodic} == set(beat)
    assert len(periodic) == 5
    for job in periodic:
        assert job.interval_setting is not None
        task, every, headers = beat[job.entry]
        assert task == job.name
        interval = float(env[job.interval_setting.upper()])
        assert every == interval
        assert headers == {"bcfy_tick_interval": interval, "bcfy_tick_grace": 12.0}
    # Entry names are what beat's schedule file keeps: unchanged.
    assert {job.entry: job.name for job in periodic} == {
        "ingest-poll-playlists": "tasks.ingest.poll_followed_playlists",
        "audio-process-pending": "tasks.audio.process_pending_audio",
        "transcription-dispatch": "tasks.transcription.dispatch_ready_calls",
        "geo-refresh": "tasks.geo.refresh_geo_data",
        "maintenance": "tasks.maintenance.prune_history",
    }


def test_time_limits_follow_the_settings():
    tasks = probe(
        {
            "JOB_SOFT_TIME_LIMIT_SEC": "100",
            "JOB_TIME_LIMIT_SEC": "200",
            "TRANSCRIBE_SOFT_TIME_LIMIT_SEC": "50",
            "TRANSCRIBE_TIME_LIMIT_SEC": "60",
        }
    )["tasks"]
    for name, (_queue, soft, hard) in tasks.items():
        if name == "tasks.transcription.transcribe_call":
            assert (soft, hard) == (50, 60)
        else:
            # The body's asyncio deadline is at 100 s; Celery's soft limit is the backstop.
            assert (soft, hard) == (150, 200), name


def test_importing_the_app_and_its_tasks_reads_no_setting():
    """A bad setting is reported where a process starts (its CLI, Celery's configuration),
    not while a module is imported."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import workers.app, beat_schedule, workers.cli.main, workers.cli.status, "
            "tasks.ingest, tasks.audio, tasks.transcription, tasks.geo, tasks.maintenance",
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "INGEST_INTERVAL_SEC": "-5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_status_lists_the_declared_periodic_jobs():
    from beat_schedule import JOBS
    from workers.cli.status import periodic_job_names

    assert periodic_job_names() == [job.name for job in JOBS if job.entry]
