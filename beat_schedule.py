"""The periodic jobs (the old scheduler's four, and retention's maintenance), for
`celery -A workers.app beat`.

Every entry is sent with `expires` = its misfire grace (JOB_MISFIRE_GRACE_SEC): a tick that
waited in the queue longer than that is dropped by the worker instead of running late. That is
how missed runs coalesce: workers that were down for two minutes find one live tick when they
come back, not twelve. The two headers let the worker recognise a duplicate tick when two beat
processes run by mistake (see workers.jobs.tick_slot).

`FirstRunScheduler` is Celery's file-backed scheduler, except that an entry beat has never run
is due at once rather than one interval after start.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from celery.beat import PersistentScheduler

from workers.settings import Settings

# Headers on every tick; workers.jobs.tick_slot reads them.
TICK_INTERVAL_HEADER = "bcfy_tick_interval"
TICK_GRACE_HEADER = "bcfy_tick_grace"

# beat entry name -> (task name, the Settings attribute giving its interval)
PERIODIC_JOBS: dict[str, tuple[str, str]] = {
    "ingest-poll-playlists": ("tasks.ingest.poll_followed_playlists", "ingest_interval_sec"),
    "audio-process-pending": ("tasks.audio.process_pending_audio", "audio_worker_interval_sec"),
    "transcription-dispatch": (
        "tasks.transcription.dispatch_ready_calls",
        "transcription_dispatch_interval_sec",
    ),
    "geo-refresh": ("tasks.geo.refresh_geo_data", "geo_refresh_interval_sec"),
    "maintenance": ("tasks.maintenance.prune_history", "maintenance_interval_sec"),
}


def beat_entry(task: str, interval: float, grace: float) -> dict[str, Any]:
    """One schedule entry: every `interval` seconds, dropped if not started within `grace`."""
    return {
        "task": task,
        "schedule": timedelta(seconds=interval),
        "options": {
            "expires": grace,
            "headers": {TICK_INTERVAL_HEADER: interval, TICK_GRACE_HEADER: grace},
        },
    }


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        entry: beat_entry(
            task, float(getattr(settings, interval_attr)), settings.job_misfire_grace_sec
        )
        for entry, (task, interval_attr) in PERIODIC_JOBS.items()
    }


class FirstRunScheduler(PersistentScheduler):
    """Celery's PersistentScheduler (last-run times kept in the schedule file), but an entry
    with no last run on record is due at once. Celery would start its first interval at beat's
    start, so a new deployment would wait a whole day for its geographic data (and a beat whose
    schedule file is not kept would never refresh it while it restarts more often than daily).
    Entries already on record keep their times: restarting beat does not re-run them early."""

    def merge_inplace(self, b: Mapping[str, Any]) -> None:
        never_run = set(b) - set(self.schedule)
        super().merge_inplace(b)
        now = self.app.now()
        for name in never_run:
            entry = self.schedule[name]
            interval = getattr(entry.schedule, "run_every", None)  # crontab entries have none
            if isinstance(interval, timedelta):
                entry.last_run_at = now - interval
