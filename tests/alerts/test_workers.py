"""The notify pool as production runs it: real worker processes (and beat), a real receiver.
Exactly one notification per rule, call and target, also when the worker is killed mid-send."""

from __future__ import annotations

import signal

import pytest

from tests.support.procs import start_beat, start_worker
from workers.core.identity import process_is_gone
from workers.dev.procs import wait_until

pytestmark = pytest.mark.slow
TOKEN = "T0KEN-5ecret-77"


def delivery_states(alerts) -> list[tuple[str, int]]:
    return [(d[2], d[3]) for d in alerts.deliveries()]


def test_a_stored_transcript_triggers_the_notify_pool(alerts, receiver, procs, tmp_path):
    env = alerts.services.worker_env(tmp_path)
    worker = start_worker("notify", env, tmp_path, queues="notify")
    procs.append(worker)
    alerts.add("fire", '"structure fire"', receiver.url(f"/hook/{TOKEN}"))
    from workers.alerts.delivery import trigger_alert_delivery

    call = alerts.call("respond to a structure fire")
    trigger_alert_delivery(call)  # as tasks.transcription.jobs does once the transcript commits
    wait_until(lambda: receiver.requests, 30, "the alert received")
    wait_until(lambda: delivery_states(alerts) == [("sent", 1)], 30, "the delivery recorded")
    assert receiver.requests[0].body["call_id"] == call
    # The target's URL carries a token: the worker's log names it by scheme and host only.
    assert f"alert fire sent to http://127.0.0.1:{receiver.port}/…" in worker.log()
    assert TOKEN not in worker.log()


def test_beat_sweeps_up_deliveries_whose_trigger_was_lost(alerts, receiver, procs, tmp_path):
    env = alerts.services.worker_env(tmp_path, ALERT_SWEEP_INTERVAL_SEC="1")
    procs.append(start_worker("notify", env, tmp_path, queues="notify"))
    alerts.add("fire", "fire", receiver.url(), f"json://127.0.0.1:{receiver.port}/apprise")
    call = alerts.call("fire in the kitchen")  # stored, no trigger sent
    procs.append(start_beat("beat", env, tmp_path, app="workers.app"))
    wait_until(lambda: len(receiver.requests) == 2, 60, "both targets notified")
    wait_until(lambda: delivery_states(alerts) == [("sent", 1)] * 2, 30, "both recorded")
    assert {r.body.get("call_id") for r in receiver.to("/hook")} == {call}
    assert alerts.services.job_runs("tasks.alerts.sweep_outbox", "ok")


def test_a_worker_killed_mid_send_sends_again_with_the_same_key(alerts, receiver, procs, tmp_path):
    """SIGKILL while the target has the request and before the worker records it: the sweep
    finds the claim's process gone and the delivery is sent again, with its idempotency key.
    The receiver sees the one notification twice under one key, and nothing else."""
    env = alerts.services.worker_env(tmp_path)
    receiver.answer("/hook", "hold")
    first = start_worker("notify1", env, tmp_path, queues="notify")
    procs.append(first)
    alerts.add("fire", "fire", receiver.url())
    from workers.alerts.delivery import trigger_alert_delivery

    alerts.call("fire at the mill")
    trigger_alert_delivery()
    wait_until(receiver.held.is_set, 30, "the send to reach the target")
    first.kill_group(signal.SIGKILL)
    first.popen.wait(10)
    receiver.release()  # its answer goes nowhere
    assert delivery_states(alerts) == [("sending", 1)]
    # The group's SIGKILL reaches the pool process that holds the claim a moment after the
    # parent's exit is seen: the sweep asks only once that process is really gone.
    [(claimant,)] = alerts.rows("SELECT claimed_by FROM alert_deliveries")
    wait_until(lambda: process_is_gone(claimant), 30, "the claimant's process gone")

    second = start_worker("notify2", env, tmp_path, queues="notify")
    procs.append(second)
    outcome = alerts.sweep()  # beat's sweep: the claimant is gone, so the delivery is due
    assert outcome.taken_back == 1 and outcome.due == 1
    trigger_alert_delivery()
    wait_until(lambda: delivery_states(alerts) == [("sent", 2)], 30, "the delivery sent again")
    first_try, second_try = receiver.requests
    assert first_try.key == second_try.key
    assert first_try.body == second_try.body
    # More sweeps and triggers change nothing.
    assert alerts.sweep().due == 0
    runs = second.log().count("deliver_alerts[")
    trigger_alert_delivery()
    wait_until(lambda: second.log().count("deliver_alerts[") > runs, 30, "one more delivery run")
    wait_until(lambda: "succeeded" in second.log().rsplit("deliver_alerts[", 1)[1], 30, "its end")
    assert len(receiver.requests) == 2
