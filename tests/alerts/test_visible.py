"""What `bcfy status --json` and the metrics show per rule: sent, failed, throttled, waiting,
the delay from transcript to sent, and failing targets."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from workers.cli.main import main
from workers.cli.metrics import alert_families
from workers.cli.status import snapshot


def test_status_json_and_metrics_per_rule(alerts, receiver, capsys):
    alerts.set_env(ALERT_MAX_PER_MINUTE="2", ALERT_TARGET_FAILING_AFTER="1")
    receiver.answer("/gone", (404, {}))
    alerts.add("fire", "fire", receiver.url())
    alerts.add("smoke", "smoke", receiver.url("/gone"))
    for n in range(5):
        alerts.call(f"fire number {n}")
    alerts.call("smoke on the water")
    alerts.deliver()

    assert main(["status", "--json"]) in (0, 1)  # 1: no worker could be asked
    snap = json.loads(capsys.readouterr().out)
    by_rule = {r["rule"]: r for r in snap["alerts"]}
    fire, smoke = by_rule["fire"], by_rule["smoke"]
    assert (fire["sent"], fire["failed"], fire["throttled"], fire["waiting"]) == (2, 0, 3, 0)
    assert fire["delay_p50_sec"] >= 0 and fire["delay_p95_sec"] >= fire["delay_p50_sec"]
    assert fire["failing_targets"] == []
    assert (smoke["sent"], smoke["failed"]) == (0, 1)
    assert smoke["failing_targets"] == [
        {
            "target": f"http://127.0.0.1:{receiver.port}/…",
            "failures": 1,
            "last_error": "refused: HTTP 404",
        }
    ]

    from workers.core.settings import get_settings

    snap_obj = snapshot(get_settings(), workers_timeout=0.1, totals=True)

    class Alerts:
        def collect(self):
            yield from alert_families(snap_obj)

    registry = CollectorRegistry()
    registry.register(Alerts())
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("bcfy_alerts_sent_total", (("rule", "fire"),))] == 2
    assert samples[("bcfy_alerts_throttled_total", (("rule", "fire"),))] == 3
    assert samples[("bcfy_alerts_failed_total", (("rule", "smoke"),))] == 1
    assert samples[("bcfy_alert_targets_failing", (("rule", "smoke"),))] == 1
    assert ("bcfy_alert_delay_seconds", (("quantile", "0.95"), ("rule", "fire"))) in samples
