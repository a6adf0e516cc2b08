"""Delivery: the message, the idempotency key, retries with backoff honouring Retry-After, a
failing target that holds nothing else up and is marked, and exactly one notification per
rule, call and target however often delivery and the sweep run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from tests.alerts.conftest import FIRE
from workers.cli.main import main


def test_the_webhook_gets_the_call_with_its_matched_words_marked(alerts, receiver):
    alerts.add("fire", '"structure fire"', receiver.url("/hook/s3cret"))
    call = alerts.call("engine twelve respond to a structure fire on oak avenue", group="7001-101")
    assert alerts.deliver() == {"sent": 1}
    (got,) = receiver.requests
    body = got.body
    assert body["rule"] == "fire" and body["call_id"] == call
    assert body["playlist"] == "County Fire"
    assert body["group_id"] == "7001-101" and body["talkgroup"] == "Fire Dispatch"
    assert body["highlighted"] == "engine twelve respond to a **structure** **fire** on oak avenue"
    assert body["audio_url"].startswith("https://calls.example/")
    assert abs(datetime.fromisoformat(body["time"]) - datetime.now(UTC)).total_seconds() < 120
    assert got.key and got.key == body["idempotency_key"]
    assert alerts.deliveries() == [("fire", f"http://127.0.0.1:{receiver.port}/…", "sent", 1, None)]


def test_apprise_json_gets_title_and_message_with_the_key(alerts, receiver):
    alerts.add("fire", "fire", f"json://127.0.0.1:{receiver.port}/apprise")
    alerts.call("smoke and fire showing", playlist=FIRE)
    assert alerts.deliver() == {"sent": 1}
    (got,) = receiver.requests
    assert got.body["title"] == "bcfy alert fire: County Fire / 7001-101 (Fire Dispatch)"
    assert "smoke and **fire** showing" in got.body["message"]
    assert "audio: https://calls.example/" in got.body["message"]
    assert got.key  # the Idempotency-Key header


def test_500_is_retried_with_the_same_key_and_then_sent(alerts, receiver):
    receiver.answer("/hook", (500, {}))
    receiver.answer("/apprise", (503, {}))
    alerts.add("fire", "fire", receiver.url(), f"json://127.0.0.1:{receiver.port}/apprise")
    alerts.call("fire")
    assert alerts.deliver() == {"pending": 2}
    states = alerts.deliveries()
    assert [(s[2], s[3], s[4]) for s in states] == [
        ("pending", 1, "HTTP 500"),
        ("pending", 1, "HTTP 503"),
    ]
    alerts.make_due()
    assert alerts.deliver() == {"sent": 2}
    for path in ("/hook", "/apprise"):
        first, second = receiver.to(path)
        assert first.key == second.key


def test_429_waits_at_least_its_retry_after(alerts, receiver):
    receiver.answer("/hook", (429, {"Retry-After": "120"}))
    alerts.add("fire", "fire", receiver.url())
    alerts.call("fire")
    alerts.deliver()
    ((state, wait),) = alerts.rows(
        "SELECT state, extract(epoch FROM due_at - now()) FROM alert_deliveries"
    )
    assert state == "pending" and 110 < wait <= 120  # the backoff alone would be 0.1 s


def test_a_refusal_fails_for_good_and_attempts_run_out(alerts, receiver):
    alerts.set_env(ALERT_MAX_ATTEMPTS="2")
    receiver.answer("/gone", (404, {}))
    receiver.answer("/busy", (500, {}), (500, {}), (500, {}))
    alerts.add("fire", "fire", receiver.url("/gone"), receiver.url("/busy"))
    alerts.call("fire")
    alerts.deliver()
    alerts.make_due()
    alerts.deliver()
    assert [(d[2], d[3], d[4]) for d in alerts.deliveries()] == [
        ("failed", 1, "refused: HTTP 404"),
        ("failed", 2, "HTTP 500 (attempt 2 of 2)"),
    ]
    alerts.make_due()
    assert alerts.deliver() == {}


def test_a_target_that_times_out_holds_up_nothing_else_and_is_marked(
    alerts, receiver, capsys, caplog
):
    alerts.set_env(ALERT_SEND_TIMEOUT_SEC="1", ALERT_TARGET_FAILING_AFTER="2")
    receiver.answer("/slow", "hold", "hold", "hold")
    alerts.add("slow", "fire", receiver.url("/slow"))
    alerts.add("quick", "fire", receiver.url("/quick"))
    alerts.call("fire on the hill")
    alerts.deliver()
    rows = alerts.rows(
        "SELECT r.name, d.state, d.last_error, d.sent_at FROM alert_deliveries d"
        " JOIN alert_outbox o ON o.id = d.outbox_id JOIN alert_rules r ON r.id = o.rule_id"
        " ORDER BY r.name"
    )
    (quick, quick_state, _, quick_sent), (slow, slow_state, slow_error, _) = rows
    assert (quick, quick_state) == ("quick", "sent")
    assert (slow, slow_state, slow_error) == ("slow", "pending", "no answer within 1s")
    # The quick rule's delivery was recorded while the slow one was still waiting.
    assert quick_sent is not None
    # Failures in a row (the retry and a new call's delivery) mark the target.
    alerts.call("fire again")
    alerts.make_due()
    alerts.deliver()
    receiver.release()
    main(["status"])
    out = capsys.readouterr().out
    assert "alerts (sent, failed, waiting, throttled" in out
    failing = f"! alert target failing: slow -> http://127.0.0.1:{receiver.port}/… (3 failures"
    assert failing + " in a row: no answer within 1s)" in out
    assert "quick  sent 2  failed 0" in out
    out = alerts.cli("show", "slow")[1]
    assert "FAILING (3 in a row: no answer within 1s)" in out
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and "in a row" in r.message]
    assert warning.message.endswith("the target has failed 2 times in a row")


def test_two_workers_and_duplicate_sweeps_send_each_delivery_once(alerts, receiver):
    alerts.add("fire", "fire", receiver.url(), f"json://127.0.0.1:{receiver.port}/apprise")
    for n in range(10):
        alerts.call(f"fire {n}")
    # Duplicate ticks: the sweep twice (it only triggers); then two workers drain together.
    assert alerts.sweep().due == 20
    assert alerts.sweep().due == 20
    from workers.alerts.delivery import deliver_due
    from workers.core.runtime import Runtime

    rt = Runtime.current()

    async def two_workers() -> tuple[dict[str, int], dict[str, int]]:
        return await asyncio.gather(
            deliver_due(rt.settings.alerts, rt.http, "one:nohost:1", 30),
            deliver_due(rt.settings.alerts, rt.http, "two:nohost:2", 30),
        )

    counts = rt.run(two_workers())
    assert sum(c.get("sent", 0) for c in counts) == 20
    keys = [r.key for r in receiver.requests]
    assert len(keys) == 20 and len(set(keys)) == 20
    assert alerts.deliver() == {}
