"""Processes the tests and benches start (workers, beat, `bcfy` commands): each in its own
process group, its output in a log file; watch their logs, stop or kill them, count their CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from workers.core.children import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """The first true value `check` returns (so never None), polling every `every` s; an
    AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Proc:
    """A child process in its own process group, its output in a log file. It gets SIGTERM if
    the process that started it dies, and `stop_all` stops every one still running."""

    running: set[Proc] = set()  # noqa: RUF012 (the registry of every Proc not yet stopped)

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
            preexec_fn=die_with_parent,
        )
        Proc.running.add(self)

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
        Proc.running.discard(self)

    @classmethod
    def stop_all(cls) -> list[str]:
        """Stop every Proc still running (a test that failed before handing its process to a
        fixture, an interrupted run); returns their names."""
        left = sorted(cls.running, key=lambda p: p.name)
        for proc in left:
            proc.stop(timeout=10)
        return [proc.name for proc in left]

    def started(self, text: str, timeout: float = 30) -> Proc:
        """Wait for its start-up line; a process that does not say it in time is stopped, so
        it never goes on taking messages from the shared queues during later tests."""
        try:
            self.wait_for_log(text, timeout)
        except BaseException:
            self.stop()
            raise
        return self


def bcfy_argv(*args: str) -> list[str]:
    """The command line of `bcfy ARGS`, run by this Python."""
    return [sys.executable, "-m", "workers.cli", *args]


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`bcfy ARGS` as an operator runs it, in a process of its own with `env` (and, unless `env`
    gives one, a PATH of the system's directories only)."""
    return subprocess.run(
        bcfy_argv(*args),
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
