"""Real worker and beat processes for tests: start, watch their logs, stop or kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if not self.alive() and text not in self.log():
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            return text in self.log()

        wait_until(seen, timeout, f"{text!r} in {self.name}'s log")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the worker and its pool children)."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.popen.wait(5)
        self.kill_group()  # any pool child left behind
        self._log.close()


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`bcfy ARGS` as an operator runs it, in a process of its own with `env` (and, unless `env`
    gives one, a PATH of the system's directories only)."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def celery(args: list[str], app: str = "tests.jobapp", prefix: Sequence[str] = ()) -> list[str]:
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
    proc.wait_for_log("ready.")
    return proc


def start_beat(
    name: str,
    env: Mapping[str, str],
    logdir: Path,
    app: str = "tests.jobapp",
    prefix: Sequence[str] = (),
) -> Proc:
    """Beat with the app's schedule: the test jobs of tests.jobapp, or production's (workers.app,
    its intervals from env)."""
    schedule = logdir / f"{name}-schedule"
    argv = celery(["beat", "-s", str(schedule), "--loglevel", "INFO"], app, prefix)
    proc = Proc(name, argv, env, logdir)
    proc.wait_for_log("beat: Starting...")
    return proc


CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_sec(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (a worker and its
    pool), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK
