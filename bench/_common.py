"""What the benches share: the servers they run on, worker processes started as production
starts them, and the report each prints and keeps in bench/results/."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from workers.core.children import sigterm_unwinds
from workers.core.processes import worker_argv
from workers.core.settings import load_settings
from workers.dev.procs import Proc
from workers.dev.services import Servers, scratch_servers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def servers(
    redis_url: str | None = None, database_url: str | None = None
) -> contextlib.AbstractContextManager[Servers]:
    """PostgreSQL and Redis for one run: a database and a Redis index of its own, on the given
    servers (by default REDIS_URL / DATABASE_URL, then the standard local ports) or throwaway
    ones (see scratch_servers)."""
    return scratch_servers(
        "bcfy_bench", "bcfy:bench", redis_url=redis_url, database_url=database_url
    )


def start_worker(queue: str, name: str, env: Mapping[str, str], logdir: Path) -> Proc:
    """`bcfy worker QUEUE`'s command line (pool type and size from env), named NAME, ready."""
    settings = load_settings({**os.environ, **env})
    argv = worker_argv(queue, settings, ["--without-mingle", "--without-gossip"])
    argv[argv.index("--hostname") + 1] = f"{name}@%h"
    return Proc(name, argv, env, logdir).started("ready.", timeout=60)


def run_bench(main: Callable[[], None]) -> None:
    """Run a bench's main so that nothing it started outlives it: SIGTERM (as from `timeout`)
    unwinds like Ctrl-C through its context managers, and any worker still running at the end
    is stopped; the workers themselves get SIGTERM should this process die without a word."""
    sigterm_unwinds()
    try:
        main()
    except KeyboardInterrupt:
        print("bench interrupted: stopping what it started", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        Proc.stop_all()


def spread(values: Iterable[float], fmt: str = ".1f") -> str:
    """A figure measured several times, as every bench prints one: "median (min\u2013max)"."""
    v = sorted(values)
    if not v:
        raise ValueError("no measurements")
    return f"{statistics.median(v):{fmt}} ({v[0]:{fmt}}\u2013{v[-1]:{fmt}})"


def rotated(items: list, round_no: int) -> list:
    """ITEMS in the order round ROUND_NO runs them: each round starts one further along, so no
    configuration always runs first (after a quiet spell) or right after the heaviest one."""
    k = round_no % len(items) if items else 0
    return items[k:] + items[:k]


def interleaved_ms(
    cases: Mapping[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """Milliseconds per case, one per round, each case warmed once first; every round times
    every case, in rotating order."""
    for fn in cases.values():
        fn()  # warm, as a running system is
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_no in range(rounds):
        for name, fn in rotated(list(cases.items()), round_no):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


def heading(script: str, details: str) -> str:
    """A report's first line: the bench, when it ran, and with what."""
    return f"# bench/{script}.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  {details}"


def report(script: str, lines: list[str], *, keep: bool = True, echo: bool = True) -> None:
    """Print the report (unless not echo) and, with keep, make it bench/results/<script>.txt."""
    text = "\n".join(lines)
    if echo:
        print(text)
    if keep:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{script}.txt").write_text(text + "\n")
