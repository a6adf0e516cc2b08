"""One worker identity, `<name>@<machine>:<pid>`: a lock's value, the audio and transcription
claims and the run log name a process alike; claims stored in the older forms are still read;
only a process on this machine that is gone counts as gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psycopg
import pytest

from tests.support.audio import add_calls, make_env
from tests.support.procs import start_worker
from tests.support.transcription import openai_env
from tests.transcription.fake_openai import fake_service
from workers.core.identity import (
    identity_of,
    machine_and_pid,
    process_is_gone,
    unique_token,
    worker_identity,
)
from workers.core.locks import holder_of
from workers.dev.procs import wait_until

CLAIM_JOB = "tasks.audio.process_pending_audio"
DISPATCH = "tasks.transcription.dispatch_ready_calls"
HERE = socket.gethostname()


def ended_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_process_names_itself_by_name_machine_and_pid():
    identity = worker_identity()
    assert identity == f"bcfy@{HERE}:{os.getpid()}", "outside a Celery worker the name is bcfy"
    assert machine_and_pid(identity) == (HERE, os.getpid())


def test_a_token_starts_with_its_holder_and_is_unique():
    tokens = {unique_token() for _ in range(100)}
    assert len(tokens) == 100
    assert {identity_of(t) for t in tokens} == {worker_identity()}
    assert identity_of(unique_token("audio@h:1")) == "audio@h:1"


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ("audio@host-a:42", ("host-a", 42)),  # today's form
        ("audio@host-a:host-b:42", ("host-b", 42)),  # claims before: <node>:<machine>:<pid>
        ("host-a:42", ("host-a", 42)),  # lock tokens' and the dev tools' <machine>:<pid>
        ("42", None),
        ("audio@host-a", None),
        ("audio@host-a:pid", None),
        ("", None),
    ],
)
def test_every_stored_form_is_read(stored, named):
    assert machine_and_pid(stored) == named


@pytest.mark.parametrize("form", ["asr@{m}:{p}", "asr@x:{m}:{p}", "{m}:{p}"])
def test_only_an_ended_process_on_this_machine_is_gone(form):
    assert process_is_gone(form.format(m=HERE, p=ended_pid()))
    assert not process_is_gone(form.format(m=HERE, p=os.getppid())), "alive"
    assert not process_is_gone(form.format(m=HERE, p=os.getpid())), "this process"
    assert not process_is_gone(form.format(m=f"not-{HERE}", p=ended_pid())), "elsewhere"
    assert not process_is_gone(None)


@pytest.mark.slow
def test_one_worker_process_has_one_name_in_its_lock_claims_and_run_log(
    db, clean, procs, client, sim, tmp_path
):
    (call_id,) = add_calls(db, sim, 1)
    with fake_service() as service:
        env = make_env(clean, tmp_path, sim, **openai_env(service))
        # One pool process takes every stage's tasks: the claim pass, the preparation, the
        # dispatch and the transcription.
        worker = start_worker("one", env, tmp_path, queues="ingest,audio,transcription")
        procs.append(worker)
        # Held until the test has read the lock: the claim pass waits on this table lock
        # while it holds its own lock in Redis.
        with psycopg.connect(clean.database_url) as blocker:
            blocker.execute("LOCK TABLE call_audio IN SHARE MODE")
            client.send_task(CLAIM_JOB, queue="audio")
            redis = clean.redis()
            token = wait_until(lambda: holder_of(redis, CLAIM_JOB), 30, "the claim pass's lock")
            redis.close()
        wait_until(
            lambda: (
                db.execute(
                    "SELECT state FROM call_transcription WHERE call_id = %s", (call_id,)
                ).fetchone()
                == ("done",)
            ),
            60,
            "the call transcribed",
        )

    identity = identity_of(token)
    machine, pid = machine_and_pid(identity) or ("", 0)
    assert identity.startswith("one@") and machine == HERE
    assert pid != worker.popen.pid, "a pool process, not the worker's main process"
    (claimed_by,) = db.execute(
        "SELECT claimed_by FROM call_transcription WHERE call_id = %s", (call_id,)
    ).fetchone()
    assert claimed_by == identity
    (lease_owner, attempt_worker) = db.execute(
        "SELECT lease_owner, worker FROM call_audio_attempts WHERE call_id = %s", (call_id,)
    ).fetchone()
    assert identity_of(lease_owner) == identity and attempt_worker == identity
    runs = clean.job_runs(CLAIM_JOB) + clean.job_runs(DISPATCH)
    assert runs and {r.worker for r in runs} == {identity}
