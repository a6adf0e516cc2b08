"""The lifetime of the processes we start: children die with their parent, and SIGTERM unwinds
like Ctrl-C, so whatever `bcfy run`, the tests and the benches start is stopped on every way
out (success, failure, Ctrl-C, SIGTERM from `timeout` or a supervisor, even SIGKILL)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
from types import FrameType

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return None


# Loaded once here: find_library runs ldconfig, which has no place between fork and exec.
_LIBC = _load_libc()


def die_with_parent() -> None:
    """A `preexec_fn`: if the process that started this child dies (even by SIGKILL), the child
    gets SIGTERM, so nothing is left running without its supervisor (Linux; elsewhere a
    no-op). Start children from the main thread: the signal follows the starting thread."""
    if _LIBC is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: a libc without prctl
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_unwinds() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does, so `finally`
    blocks and context managers stop what this process started. Python's default for SIGTERM
    ends the process at once and skips them all."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
