"""The periodic jobs (the old scheduler's four, and retention's maintenance), for
`celery -A workers.app beat`.

Every tick carries three headers: its interval, its misfire grace (JOB_MISFIRE_GRACE_SEC), and
the moment beat sent it by Redis's clock (`TIME`). A worker drops a tick that waited longer than
its grace, judged by Redis's clock too (workers.core.locks), instead of running it late. That is how
missed runs coalesce: workers that were down for two minutes find one live tick when they come
back, not twelve. No host's own clock takes part, so a worker or beat whose clock is minutes
off still runs every tick (Celery's `expires`, an absolute time from beat's clock checked
against the worker's, would drop them all). The same headers let the worker recognise a
duplicate tick when two beat processes run by mistake (see workers.core.jobs.Tick).

`FirstRunScheduler` is Celery's file-backed scheduler, except that an entry beat has never run
is due at once rather than one interval after start, and that it stamps each tick.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TypedDict

import redis
from celery.beat import PersistentScheduler, ScheduleEntry

from workers.core.clock import Reporter, measure
from workers.core.settings import Settings, get_settings

# Headers on every tick; workers.core.jobs.tick_of reads them.
TICK_INTERVAL_HEADER = "bcfy_tick_interval"
TICK_GRACE_HEADER = "bcfy_tick_grace"
TICK_SENT_HEADER = "bcfy_tick_sent_ms"  # Redis's clock when beat sent it; set per tick

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


class BeatOptions(TypedDict):
    headers: dict[str, float]


class BeatEntry(TypedDict):
    """One entry of Celery's `beat_schedule` setting."""

    task: str
    schedule: timedelta
    options: BeatOptions


def beat_entry(task: str, interval: float, grace: float) -> BeatEntry:
    """One schedule entry: every `interval` seconds, dropped if not started within `grace`
    (by Redis's clock: FirstRunScheduler adds the send time to each tick)."""
    return {
        "task": task,
        "schedule": timedelta(seconds=interval),
        "options": {"headers": {TICK_INTERVAL_HEADER: interval, TICK_GRACE_HEADER: grace}},
    }


def tick_headers(interval: float, grace: float, sent_ms: int) -> dict[str, float]:
    """The headers of one tick sent at `sent_ms` (Redis's clock)."""
    return {
        TICK_INTERVAL_HEADER: interval,
        TICK_GRACE_HEADER: grace,
        TICK_SENT_HEADER: sent_ms,
    }


def build_beat_schedule(settings: Settings) -> dict[str, BeatEntry]:
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
    Entries already on record keep their times: restarting beat does not re-run them early.

    Each tick is stamped with Redis's time as it is sent (one `TIME` round trip, on the broker
    beat publishes to anyway), and beat reports its own clock's offset from Redis's for
    `bcfy status`."""

    _clock: redis.Redis | None = None
    _clock_reporter: Reporter | None = None

    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        if advance:
            # celery-types says reserve() returns an event_t; Celery returns the next entry.
            entry = self.reserve(entry)  # type: ignore[assignment]
        headers = dict((entry.options or {}).get("headers") or {})
        if TICK_INTERVAL_HEADER in headers:
            reading = measure(self._redis())
            headers[TICK_SENT_HEADER] = reading.redis_time_ms
            reporter = self._reporter()
            if reporter.due():
                reporter.run(reading)
            entry = copy.copy(entry)  # the stamp is this tick's, not the stored entry's
            entry.options = {**(entry.options or {}), "headers": headers}
        return super().apply_async(entry, producer, advance=False, **kwargs)

    def _redis(self) -> redis.Redis:
        if self._clock is None:
            self._clock = redis.Redis.from_url(
                get_settings().redis_url.reveal(), socket_timeout=5, socket_connect_timeout=5
            )
        return self._clock

    def _reporter(self) -> Reporter:
        if self._clock_reporter is None:
            node = f"beat@{socket.gethostname()}"
            grace = get_settings().job_misfire_grace_sec
            self._clock_reporter = Reporter(self._redis(), "beat", node, grace)
        return self._clock_reporter

    def close(self) -> None:
        super().close()
        if self._clock is not None:
            self._clock.close()
            self._clock = None

    def merge_inplace(self, b: Mapping[str, BeatEntry]) -> None:  # type: ignore[override]
        # Celery passes its beat_schedule setting (name -> BeatEntry); celery-types says
        # dict[str, ScheduleEntry].
        never_run = set(b) - set(self.schedule)
        super().merge_inplace(b)  # type: ignore[arg-type]
        now = self.app.now()
        for name in never_run:
            entry = self.schedule[name]
            interval = getattr(entry.schedule, "run_every", None)  # crontab entries have none
            if isinstance(interval, timedelta):
                entry.last_run_at = now - interval
