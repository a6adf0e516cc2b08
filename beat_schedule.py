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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypedDict

import redis
from celery.beat import PersistentScheduler, ScheduleEntry

from workers.core.clock import Reporter, measure
from workers.core.settings import Settings

# Headers on every tick; workers.core.jobs.tick_of reads them.
TICK_INTERVAL_HEADER = "bcfy_tick_interval"
TICK_GRACE_HEADER = "bcfy_tick_grace"
TICK_SENT_HEADER = "bcfy_tick_sent_ms"  # Redis's clock when beat sent it; set per tick

QUEUES = ("ingest", "audio", "transcription")


@dataclass(frozen=True)
class Job:
    """One Celery task, declared once. The app's routes, beat's schedule, the tasks' time limits
    and `bcfy status`'s job list are all derived from JOBS (a test checks that every registered
    task is declared here). Settings are named by their variable (Settings.value), read when a
    process starts (workers.app.configure)."""

    name: str  # the Celery task name: fixed, deployed schedules and queued messages use it
    queue: str
    # A periodic job: beat's entry name (kept in beat's schedule file) and the settings giving
    # its interval and its misfire grace. None for a task sent by other tasks.
    entry: str | None = None
    interval_setting: str | None = None
    grace_setting: str = "JOB_MISFIRE_GRACE_SEC"
    # Celery's time limits. With `backstop`, the body has its own asyncio deadline at the soft
    # setting, and Celery's soft limit (between soft and hard) is only the backstop.
    soft_limit_setting: str = "JOB_SOFT_TIME_LIMIT_SEC"
    hard_limit_setting: str = "JOB_TIME_LIMIT_SEC"
    backstop: bool = True

    def time_limits(self, settings: Settings) -> dict[str, float]:
        soft = float(settings.value(self.soft_limit_setting))
        hard = float(settings.value(self.hard_limit_setting))
        if self.backstop:
            return {"soft_time_limit": (soft + hard) / 2, "time_limit": hard}
        return {"soft_time_limit": soft, "time_limit": hard}


JOBS: tuple[Job, ...] = (
    Job(
        "tasks.ingest.poll_followed_playlists",
        "ingest",
        entry="ingest-poll-playlists",
        interval_setting="INGEST_INTERVAL_SEC",
    ),
    Job("tasks.ingest.backfill_gaps", "ingest"),  # triggered by the poll
    Job(
        "tasks.audio.process_pending_audio",
        "audio",
        entry="audio-process-pending",
        interval_setting="AUDIO_WORKER_INTERVAL_SEC",
    ),
    Job("tasks.audio.prepare_calls", "audio"),  # sent by the claim pass
    # The dispatcher is light: it runs with ingest's jobs, not on the recognisers' queue.
    Job(
        "tasks.transcription.dispatch_ready_calls",
        "ingest",
        entry="transcription-dispatch",
        interval_setting="TRANSCRIPTION_DISPATCH_INTERVAL_SEC",
    ),
    # Sent by the dispatcher, one per call; Celery's limits are its only ones.
    Job(
        "tasks.transcription.transcribe_call",
        "transcription",
        soft_limit_setting="TRANSCRIBE_SOFT_TIME_LIMIT_SEC",
        hard_limit_setting="TRANSCRIBE_TIME_LIMIT_SEC",
        backstop=False,
    ),
    Job(
        "tasks.geo.refresh_geo_data",
        "ingest",
        entry="geo-refresh",
        interval_setting="GEO_REFRESH_INTERVAL_SEC",
    ),
    Job(
        "tasks.maintenance.prune_history",
        "ingest",
        entry="maintenance",
        interval_setting="MAINTENANCE_INTERVAL_SEC",
    ),
)
JOBS_BY_NAME: dict[str, Job] = {job.name: job for job in JOBS}
PERIODIC_JOBS: tuple[Job, ...] = tuple(job for job in JOBS if job.entry)
# A task not declared above (the tests' own periodic jobs) is limited as a periodic job is.
DEFAULT_JOB = Job("", "ingest")


def task_routes() -> dict[str, dict[str, str]]:
    """Celery's `task_routes`: each declared task to its queue (others: the default queue)."""
    return {job.name: {"queue": job.queue} for job in JOBS}


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
    """Beat's schedule: an entry per periodic job in JOBS, interval and grace from `settings`."""
    schedule: dict[str, BeatEntry] = {}
    for job in PERIODIC_JOBS:
        assert job.entry is not None and job.interval_setting is not None
        schedule[job.entry] = beat_entry(
            job.name,
            float(settings.value(job.interval_setting)),
            float(settings.value(job.grace_setting)),
        )
    return schedule


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
            from workers.app import configured_settings

            self._clock = redis.Redis.from_url(
                configured_settings().services.redis_url.reveal(),
                socket_timeout=5,
                socket_connect_timeout=5,
            )
        return self._clock

    def _reporter(self) -> Reporter:
        if self._clock_reporter is None:
            node = f"beat@{socket.gethostname()}"
            from workers.app import configured_settings

            grace = configured_settings().jobs.misfire_grace_sec
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
