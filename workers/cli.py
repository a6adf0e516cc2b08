"""`bcfy`: the operator's command line.

bcfy migrate            apply pending schema migrations (creates the database if missing)
bcfy settings           print the effective settings, secrets redacted
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from workers.settings import Settings, SettingsError, get_settings

Command = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


@command("migrate")
def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from workers.migrate import MigrationError, ensure_database, migrate

    dsn = settings.database_url.reveal()
    try:
        if ensure_database(dsn):
            print("created the database")
        migrate(dsn)
    except MigrationError as exc:
        print(f"bcfy migrate: {exc}", file=sys.stderr)
        return 1
    return 0


@command("settings")
def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for name, value in settings.describe().items():
        print(f"{name}={value}")
    return 0


@command("run")
def _run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.devrun import run

    return run(settings, flower_port=args.flower_port)


def _exec(argv: list[str]) -> int:
    """Replace this process, so signals reach Celery directly (as in a container)."""
    os.execv(argv[0], argv)
    return 0  # not reached


@command("worker")
def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.processes import worker_argv

    return _exec(worker_argv(args.queue, settings, args.celery_args))


@command("beat")
def _beat(args: argparse.Namespace, settings: Settings) -> int:
    from workers.processes import beat_argv

    return _exec(beat_argv(settings, args.celery_args))


@command("flower")
def _flower(args: argparse.Namespace, settings: Settings) -> int:
    from workers.processes import flower_argv

    return _exec(flower_argv(settings, args.port, args.celery_args))


@command("healthcheck")
def _healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from workers.health import check

    ok, message = check(args.what, args.arg, settings)
    print(message)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcfy", description="Broadcastify calls pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="apply pending schema migrations")
    sub.add_parser("settings", help="print the effective settings (secrets redacted)")
    run = sub.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--flower-port", type=int, default=5555)
    worker = sub.add_parser("worker", help="start the worker pool of one queue")
    worker.add_argument("queue", choices=["ingest", "audio", "transcription"])
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")
    beat = sub.add_parser("beat", help="start the scheduler (exactly one per deployment)")
    beat.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery beat")
    flower = sub.add_parser("flower", help="start the Flower dashboard")
    flower.add_argument("--port", type=int, default=5555)
    flower.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery flower")
    health = sub.add_parser("healthcheck", help="container healthchecks: exit 0 when healthy")
    health.add_argument("what", choices=["beat", "worker", "flower"])
    health.add_argument("arg", nargs="?", help="worker: its queue; flower: its port")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"bcfy: cannot start: {exc}", file=sys.stderr)
        return 2
    return _COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
