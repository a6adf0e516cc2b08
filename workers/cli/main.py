"""`bcfy`: the operator's command line.

    bcfy migrate                 apply pending schema migrations (creates the database if missing)
    bcfy settings                print the effective settings, secrets redacted
    bcfy run                     the whole pipeline on this machine (see workers.cli.run)
    bcfy worker QUEUE [ARGS]     a worker pool for one queue: ingest, audio or transcription
    bcfy beat [ARGS]             the scheduler (run exactly one)
    bcfy flower [ARGS]           the Flower dashboard
    bcfy healthcheck WHAT        exit 0 when beat / a worker / Flower is healthy (compose)
    bcfy status [--json]         backlog, throughput, failures, playlists, locks, queues, workers
    bcfy metrics [--port N]      the pipeline's Prometheus metrics (Flower has Celery's)
    bcfy schema [--check]        write sql/schema.sql: the whole schema after all migrations
    bcfy sim | playlists | search | audio    see `bcfy COMMAND --help`

Other areas add their own subcommands: each module in COMMAND_MODULES has
`add_commands(sub)`, which adds subparsers with `set_defaults(handler=fn)`, where
`fn(args, settings) -> int` is the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from workers.cli import Subparsers
from workers.core.settings import Settings, SettingsError, get_settings

Handler = Callable[[argparse.Namespace, Settings], int]

# Modules that add subcommands, besides the ones below.
COMMAND_MODULES: list[str] = [
    "workers.dev.simulator.cli",
    "workers.cli.playlists",
    "workers.cli.search",
    "workers.cli.audio",
    "workers.cli.status",
    "workers.cli.metrics",
    "workers.cli.schema",
]


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from workers.core.migrate import MigrationError, ensure_database, migrate

    dsn = settings.services.database_url.reveal()
    try:
        if ensure_database(dsn):
            print("created the database")
        migrate(dsn)
    except MigrationError as exc:
        print(f"bcfy migrate: {exc}", file=sys.stderr)
        return 1
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for name, value in settings.describe().items():
        print(f"{name}={value}")
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli.run import run

    return run(settings, flower_port=args.flower_port)


def _exec(argv: list[str]) -> int:
    """Replace this process, so signals reach Celery directly (as in a container)."""
    os.execv(argv[0], argv)
    return 0  # not reached


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.core.processes import worker_argv

    return _exec(worker_argv(args.queue, settings, args.celery_args))


def _beat(args: argparse.Namespace, settings: Settings) -> int:
    from workers.core.processes import beat_argv

    return _exec(beat_argv(settings, args.celery_args))


def _flower(args: argparse.Namespace, settings: Settings) -> int:
    from workers.core.processes import flower_argv, flower_refusal

    refusal = flower_refusal(settings, args.celery_args)
    if refusal:
        # Flower can revoke tasks and shut workers down: never open it unauthenticated.
        print(f"bcfy flower: {refusal}", file=sys.stderr)
        return 2
    return _exec(flower_argv(settings, args.port, args.celery_args))


def _healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli.health import check

    ok, message = check(args.what, args.arg, settings)
    print(message)
    return 0 if ok else 1


def _add_core_commands(sub: Subparsers) -> None:
    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(handler=_migrate)
    sub.add_parser("settings", help="print the effective settings (secrets redacted)").set_defaults(
        handler=_settings
    )
    run = sub.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--flower-port", type=int, default=5555)
    run.set_defaults(handler=_run)
    worker = sub.add_parser("worker", help="start the worker pool of one queue")
    worker.add_argument("queue", choices=["ingest", "audio", "transcription"])
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")
    worker.set_defaults(handler=_worker)
    beat = sub.add_parser("beat", help="start the scheduler (exactly one per deployment)")
    beat.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery beat")
    beat.set_defaults(handler=_beat)
    flower = sub.add_parser("flower", help="start the Flower dashboard")
    flower.add_argument("--port", type=int, default=5555)
    flower.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery flower")
    flower.set_defaults(handler=_flower)
    health = sub.add_parser("healthcheck", help="container healthchecks: exit 0 when healthy")
    health.add_argument("what", choices=["beat", "worker", "flower", "metrics"])
    health.add_argument("arg", nargs="?", help="worker: its queue; flower, metrics: the port")
    health.set_defaults(handler=_healthcheck)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcfy", description="Broadcastify calls pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_core_commands(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


# Commands that hand unknown options on to Celery (`bcfy flower --address=127.0.0.1`).
_PASS_THROUGH = ("worker", "beat", "flower")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command not in _PASS_THROUGH:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.celery_args = unknown + args.celery_args
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"bcfy: cannot start: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
