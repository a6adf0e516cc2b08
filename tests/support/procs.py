"""Worker and beat processes of the tests' Celery app (tests.support.jobapp: production's app
plus test jobs), and the addresses a process listens on."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from workers.dev.procs import Proc

JOBAPP = "tests.support.jobapp"


def celery(args: list[str], app: str = JOBAPP, prefix: Sequence[str] = ()) -> list[str]:
    """`celery -A app ARGS`, run through `prefix` (e.g. `faketime -f +120s`) when given."""
    return [*prefix, sys.executable, "-m", "celery", "-A", app, *args]


def start_worker(
    name: str,
    env: Mapping[str, str],
    logdir: Path,
    *,
    queues: str = "ingest",
    concurrency: int = 1,
    pool: str = "prefork",
    prefix: Sequence[str] = (),
) -> Proc:
    proc = Proc(
        name,
        celery(
            [
                "worker",
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
            ],
            prefix=prefix,
        ),
        env,
        logdir,
    )
    return proc.started("ready.")


def start_beat(
    name: str,
    env: Mapping[str, str],
    logdir: Path,
    app: str = JOBAPP,
    prefix: Sequence[str] = (),
) -> Proc:
    """Beat with the app's schedule: the test jobs of tests.support.jobapp, or production's
    (workers.app, its intervals from env)."""
    schedule = logdir / f"{name}-schedule"
    argv = celery(["beat", "-s", str(schedule), "--loglevel", "INFO"], app, prefix)
    return Proc(name, argv, env, logdir).started("beat: Starting...")


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    words = [raw[i : i + 4][::-1].hex() for i in range(0, 16, 4)]
                    found.add(":".join("".join(words)[i : i + 4] for i in range(0, 32, 4)))
    return found
