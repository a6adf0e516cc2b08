"""Per rule: what was sent, failed, throttled, and how long after the transcript; targets that
keep failing. Read by `bcfy alerts list|show`, `bcfy status` and the metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

RULE_STATS_SQL = """
SELECT r.name, r.enabled,
       (SELECT count(*) FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id
         WHERE o.rule_id = r.id AND d.state = 'sent'),
       (SELECT count(*) FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id
         WHERE o.rule_id = r.id AND d.state = 'failed'),
       (SELECT count(*) FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id
         WHERE o.rule_id = r.id AND d.state IN ('pending', 'sending')),
       (SELECT count(*) FROM alert_outbox o
         WHERE o.rule_id = r.id AND o.state IN ('throttled', 'summarized')),
       (SELECT percentile_cont(array[0.5, 0.95]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM d.sent_at - o.created_at))
          FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id
         WHERE o.rule_id = r.id AND d.state = 'sent' AND d.sent_at > now() - interval '1 hour'),
       (SELECT coalesce(json_agg(json_build_array(tg.shown, tg.consecutive_failures,
                                                  tg.last_error) ORDER BY tg.id), '[]')
          FROM alert_targets tg
         WHERE tg.rule_id = r.id AND tg.consecutive_failures >= %(failing_after)s)
  FROM alert_rules r
 ORDER BY r.name
"""


@dataclass(frozen=True)
class FailingTarget:
    target: str  # shown_target: never the whole URL
    failures: int  # in a row
    last_error: str | None


@dataclass(frozen=True)
class RuleStats:
    rule: str
    enabled: bool
    sent: int
    failed: int  # for good
    waiting: int  # pending or being sent
    throttled: int  # calls over ALERT_MAX_PER_MINUTE, sent as part of a summary
    delay_p50_sec: float | None  # transcript stored to sent, last hour
    delay_p95_sec: float | None
    failing_targets: list[FailingTarget] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def rule_stats(conn: psycopg.Connection[Any], failing_after: int) -> list[RuleStats]:
    out = []
    for row in conn.execute(RULE_STATS_SQL, {"failing_after": failing_after}).fetchall():
        name, enabled, sent, failed, waiting, throttled, delays, failing = row
        p50, p95 = delays if delays else (None, None)
        out.append(
            RuleStats(
                name,
                enabled,
                sent,
                failed,
                waiting,
                throttled,
                p50,
                p95,
                [FailingTarget(*t) for t in failing],
            )
        )
    return out
