"""The Celery app: `celery -A workers.app worker|beat|flower`.

Three queues, each consumed by its own worker pool (see the Makefile's worker-* targets):
  ingest         polling the service, transcription dispatch, geo refresh, maintenance
                 (light, I/O bound)
  audio          downloads and audio preparation (I/O, then some CPU)
  transcription  speech recognition (CPU bound, long)

Settings that must agree:
  * late acks with prefetch 1: a busy child holds no queued message, so an idle worker takes
    the next tick; a tick redelivered after a crash is past its grace and dropped (lateness is
    judged by Redis's clock, see beat_schedule; each worker reports its own clock's offset,
    ClockReport below);
  * every task's hard time limit is below the broker's visibility timeout (checked in settings),
    so Redis never hands a message that may still be running to a second worker;
  * no result backend: nothing reads task results; the pipeline's state lives in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, bootsteps, signals
from kombu import Exchange, Queue

from beat_schedule import DEFAULT_JOB, JOBS_BY_NAME, QUEUES, build_beat_schedule, task_routes
from workers.core.identity import set_worker_name
from workers.core.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    import redis
    from celery.worker.consumer import Consumer
    from celery.worker.worker import WorkController
    from kombu.asynchronous.timer import Entry

__all__ = ["QUEUES", "app", "configure", "configured_settings"]

log = logging.getLogger(__name__)

# Built without settings: importing this module (a task module, `bcfy status`) reads none.
# Its configuration comes from `configure`, called where a process starts: by the CLI with the
# settings it read, or, in a Celery process (`celery -A workers.app ...`), when Celery first
# needs its configuration (the on_configure signal below).
app = Celery(
    "bcfy",
    include=[
        "tasks.ingest",
        "tasks.audio",
        "tasks.transcription",
        "tasks.geo",
        "tasks.maintenance",
    ],
)

_settings: Settings | None = None


def configure(settings: Settings) -> None:
    """Apply `settings` to the app, where a process starts and before it uses the app. The app
    is configured once per process: a later call changes nothing."""
    global _settings
    if _settings is not None:
        return
    _settings = settings
    app.conf.update(celery_config(settings))


def configured_settings() -> Settings:
    """The settings the app was configured with (configuring it now if nothing has)."""
    app.conf.get("broker_url")  # reading the configuration configures it
    assert _settings is not None
    return _settings


@app.on_configure.connect
def _configure_from_environment(sender: Celery, **_: Any) -> None:
    """A Celery process (worker, beat, Flower) reads the settings here, once: the first time
    Celery needs its configuration. A bad setting stops it with a message naming the variable,
    not a traceback."""
    if _settings is not None:
        return  # configured by the process that started (the CLI)
    try:
        settings = get_settings()
    except SettingsError as exc:
        sys.exit(f"bcfy: cannot start: {exc}")
    configure(settings)


class TimeLimits:
    """Celery's `task_annotations`: each task's time limits, from the settings its declaration
    (beat_schedule.JOBS) names. Tasks not declared there (the tests' own periodic jobs) are
    limited as a periodic job is; Celery's own tasks are left alone."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def annotate(self, task: Task) -> dict[str, float] | None:
        if task.name.startswith("celery."):
            return None
        return JOBS_BY_NAME.get(task.name, DEFAULT_JOB).time_limits(self.settings)


def _beat_schedule_file(settings: Settings) -> str:
    """Beat keeps its last-run times here; the directory must exist before beat opens it."""
    state = Path(settings.services.state_dir)
    with contextlib.suppress(OSError):
        state.mkdir(parents=True, exist_ok=True)
    return str(state / "celerybeat-schedule")


def celery_config(settings: Settings) -> dict[str, Any]:
    """The app's Celery configuration for `settings`."""
    return {
        "broker_url": settings.services.redis_url.reveal(),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_default_queue": "ingest",
        "task_routes": [task_routes()],
        "task_annotations": [TimeLimits(settings)],
        "task_create_missing_queues": False,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_time_limit": settings.jobs.time_limit_sec,
        "broker_transport_options": {
            "visibility_timeout": settings.jobs.broker_visibility_timeout_sec,
        },
        "broker_connection_retry_on_startup": True,
        # With late acks, a task still running when the broker connection drops would be
        # delivered again elsewhere; cancelling it avoids running it twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": build_beat_schedule(settings),
        "beat_scheduler": "beat_schedule:FirstRunScheduler",
        "beat_schedule_filename": _beat_schedule_file(settings),
        "beat_max_loop_interval": 1,
        # Beat saves its schedule after every tick: the file's age is its healthcheck.
        "beat_sync_every": 1,
    }


@signals.worker_process_init.connect
def _pool_child_started(**_: object) -> None:
    """Each prefork child makes its own loop, pool and clients (after the fork, never before)."""
    from workers.core.runtime import Runtime, mark_pool_child

    mark_pool_child()
    Runtime.current()


@signals.celeryd_after_setup.connect
def _name_the_worker(sender: str, **_: object) -> None:
    """Locks, claims and run logs name this worker's processes after its node (before the pool
    forks, so pool processes inherit the name)."""
    set_worker_name(sender)


@signals.celeryd_after_setup.connect
def _warn_about_the_solo_pool(sender: str, instance: WorkController, **_: object) -> None:
    """The solo pool runs tasks in the worker's own process, where Celery cannot enforce time
    limits. Periodic jobs keep theirs (an asyncio timeout), but a stuck transcription holds its
    pool until its claim runs out and the call is sent elsewhere. Fine for debugging; say so."""
    pool = instance.pool_cls  # type: ignore[attr-defined]  # set by setup_defaults; not in celery-types
    name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__qualname__}"
    if "solo" in name.lower():
        log.warning(
            "worker %s: solo pool: Celery's task time limits are not enforced here; "
            "use prefork in production",
            sender,
        )


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_runtime(**_: object) -> None:
    from workers.core.runtime import Runtime

    Runtime.shutdown_current()


class ClockReport(bootsteps.StartStopStep):
    """Each worker measures its clock's offset from Redis's at start and every
    REPORT_EVERY_SEC, and records it (a key with a TTL) for `bcfy status`; a large offset is
    logged at WARNING. Runs on the consumer's timer: one `TIME` and one `SET` per period."""

    def __init__(self, parent: Consumer, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Entry | None = None
        self.client: redis.Redis | None = None

    def start(self, c: Consumer) -> None:
        import redis

        from workers.core.clock import REPORT_EVERY_SEC, Reporter

        settings = configured_settings()
        self.client = redis.Redis.from_url(
            settings.services.redis_url.reveal(), socket_timeout=2, socket_connect_timeout=2
        )
        reporter = Reporter(self.client, "worker", c.hostname, settings.jobs.misfire_grace_sec)
        reporter.run()
        self.tref = c.timer.call_repeatedly(REPORT_EVERY_SEC, reporter.run, priority=10)

    def stop(self, c: Consumer) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.client is not None:
            self.client.close()
            self.client = None

    shutdown = stop


app.steps["consumer"].add(ClockReport)
