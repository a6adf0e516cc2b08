"""Warm shutdown of a transcription worker mid-call (SIGTERM, as `docker stop` sends): it
finishes the call it is recognising, takes nothing new, exits 0; the call waiting in the queue
is transcribed by a later worker. One transcript per call, one request per call."""

from __future__ import annotations

import signal
import threading

import pytest

from tests.support.transcription import openai_env, send_to_transcribe, start_transcription
from tests.transcription.fake_openai import Reply
from workers.dev.procs import wait_until

pytestmark = pytest.mark.slow


def test_sigterm_mid_call_finishes_it_and_leaves_the_next_to_a_later_worker(
    calls, procs, tmp_path, client, service
):
    release = threading.Event()
    service.replies.append(Reply(hold=release))  # the first request waits for the test
    env = calls.worker_env(tmp_path, **openai_env(service))
    first = start_transcription(procs, env, tmp_path, "asr1")
    ids = [calls.add("call01.m4a"), calls.add("call04.m4a")]
    for call_id in ids:
        send_to_transcribe(calls, client, call_id)
    service.wait_for_requests(1)
    in_hand = next(i for i in ids if calls.state(i)["state"] == "running")
    waiting = next(i for i in ids if i != in_hand)

    first.popen.send_signal(signal.SIGTERM)
    first.wait_for_log("Warm shutdown")
    release.set()
    assert first.popen.wait(60) == 0, first.log()[-3000:]
    assert calls.state(in_hand)["state"] == "done", "the call in hand was finished"
    assert calls.state(waiting)["state"] == "dispatched", "the next one was not started"
    assert len(service.requests) == 1

    second = start_transcription(procs, env, tmp_path, "asr2")
    wait_until(lambda: calls.state(waiting)["state"] == "done", 90, "the waiting call done")

    for call_id in ids:
        assert len(calls.transcripts(call_id)) == 1, call_id
        assert calls.state(call_id)["attempts"] == 1, call_id
    assert len(service.requests) == 2, "each call recognised once"
    assert f"call {in_hand} transcribed by" in first.log()
    assert f"call {waiting} transcribed by" in second.log()
    assert f"call {waiting} transcribed by" not in first.log()
