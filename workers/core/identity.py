"""Who holds a lock, a claim or a run: one form for every process, `<name>@<machine>:<pid>`.

name is the Celery worker's name (its node name up to the '@': the queue for `bcfy worker`,
so `audio@host:4242` starts with the node `bcfy status` lists as online), or `bcfy` in any
other process; machine is this host's name and pid this process's id. It is what
job_runs.worker, call_audio_attempts.worker and call_transcription.claimed_by hold.

A lock's value and an audio claim's lease_owner must also tell one run (or one claim pass) of
a process from the next, so they are tokens: the identity and a random part,
`<identity>:<12 hex digits>`; `identity_of` gives the identity back.

`process_is_gone` reads the forms stored before this one too (`<node>:<machine>:<pid>` of
claims, `<machine>:<pid>`), so rows written by an older release are still judged correctly.
"""

from __future__ import annotations

import os
import socket
import uuid

_OTHER_PROCESS = "bcfy"
_worker_name: str | None = None


def set_worker_name(node: str) -> None:
    """Name this process (and the pool processes it forks) after its Celery node
    (`audio@host` -> `audio`). Called once, as a worker starts."""
    global _worker_name
    _worker_name = node.split("@", 1)[0] or None


def worker_identity() -> str:
    """`<name>@<machine>:<pid>`: this process, as every lock, claim and run log names it."""
    return f"{_worker_name or _OTHER_PROCESS}@{socket.gethostname()}:{os.getpid()}"


def unique_token(identity: str | None = None) -> str:
    """`<identity>:<12 hex digits>`: names its holder and is unique to one run or claim."""
    return f"{identity or worker_identity()}:{uuid.uuid4().hex[:12]}"


def identity_of(token: str) -> str:
    """The identity a token (`unique_token`) starts with."""
    return token.rsplit(":", 1)[0]


def machine_and_pid(identity: str) -> tuple[str, int] | None:
    """The machine and process an identity names, in this form or an older one; None when it
    names none."""
    who, _, pid = identity.rpartition(":")
    if not who or not pid.isdigit():
        return None
    # `<name>@<machine>`, or before: `<node>:<machine>` and `<machine>`.
    machine = who.rpartition(":")[2].rpartition("@")[2]
    return machine, int(pid)


def process_is_gone(identity: str | None) -> bool:
    """True only when `identity` names a process on this machine that no longer exists: a pool
    process that died (the OOM killer, a crash in native code).

    Anything else (another machine, a form naming no process, a live process, this process, a
    pid reused by a new process) counts as alive, so what it holds is left to run out. A
    transcription claim taken over from a holder that was in fact alive costs a second
    recognition, never a second transcript (transcripts.call_id is unique)."""
    named = machine_and_pid(identity or "")
    if named is None:
        return False
    machine, pid = named
    if machine != socket.gethostname() or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False
