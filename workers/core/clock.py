"""One clock for every host: Redis's `TIME`.

Beat stamps each tick with Redis's time and a worker judges a tick late by Redis's time too (in
the lock's acquire script), so whether a tick runs never depends on two hosts' clocks agreeing.
Each worker (and beat) still measures how far its own clock is from Redis's and reports it under
a key with a TTL; `bcfy status` lists those offsets and warns about large ones, because the
timestamps a host writes (job runs, logs) are off by as much.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "bcfy:clock:"
REPORT_EVERY_SEC = 15.0  # how often a worker or beat re-measures its offset
REPORT_TTL_SEC = 60  # a report older than this is gone: its process stopped reporting
# An offset beyond this fraction of JOB_MISFIRE_GRACE_SEC is worth a warning: ticks no longer
# depend on it, but job_runs times and log lines from that host are off by as much.
WARN_FRACTION = 0.25


@dataclass(frozen=True)
class Reading:
    offset_sec: float  # this host's clock minus Redis's (positive: this host is ahead)
    round_trip_sec: float  # the measurement's uncertainty is half of this
    redis_time_ms: int


def redis_time_ms(client: redis.Redis) -> int:
    """Redis's clock, in milliseconds since the epoch."""
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def measure(client: redis.Redis) -> Reading:
    """This host's offset from Redis's clock, taken at the middle of one `TIME` round trip."""
    before = time.time()
    server_ms = redis_time_ms(client)
    after = time.time()
    return Reading(
        offset_sec=(before + after) / 2 - server_ms / 1000,
        round_trip_sec=after - before,
        redis_time_ms=server_ms,
    )


def report(client: redis.Redis, kind: str, node: str, reading: Reading) -> None:
    """Record a reading under `bcfy:clock:<node>` for `bcfy status`; it expires on its own."""
    value = {
        "kind": kind,
        "offset_sec": round(reading.offset_sec, 3),
        "round_trip_sec": round(reading.round_trip_sec, 4),
        "measured_at_ms": reading.redis_time_ms,
    }
    client.set(KEY_PREFIX + node, json.dumps(value), ex=REPORT_TTL_SEC)


def reports(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every live report, by node name."""
    keys = sorted(client.scan_iter(match=KEY_PREFIX + "*", count=100))
    found: dict[str, dict[str, Any]] = {}
    for key, value in zip(keys, client.mget(keys) if keys else [], strict=True):
        if value is None:
            continue  # expired between SCAN and MGET
        name = key.decode() if isinstance(key, bytes) else str(key)
        try:
            found[name.removeprefix(KEY_PREFIX)] = json.loads(value)
        except ValueError:
            continue
    return found


def warn_above(grace_sec: float) -> float:
    return grace_sec * WARN_FRACTION


def describe(kind: str, node: str, offset_sec: float) -> str:
    side = "ahead of" if offset_sec > 0 else "behind"
    return f"{kind} {node} is {abs(offset_sec):.1f}s {side} Redis's clock"


class Reporter:
    """Measures and reports one process's offset; logs a WARNING when it becomes too large
    (and once more when it is back within bounds). Never raises: a failed measurement is
    logged and the next one tried."""

    def __init__(self, client: redis.Redis, kind: str, node: str, grace_sec: float) -> None:
        self.client = client
        self.kind = kind
        self.node = node
        self.limit = warn_above(grace_sec)
        self.grace_sec = grace_sec
        self._too_far: bool | None = None
        self._next_at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next_at

    def run(self, reading: Reading | None = None) -> None:
        self._next_at = time.monotonic() + REPORT_EVERY_SEC
        try:
            reading = reading or measure(self.client)
            report(self.client, self.kind, self.node, reading)
        except redis.RedisError as exc:
            log.warning("%s %s: could not compare its clock with Redis's: %s", *self.who(), exc)
            return
        too_far = abs(reading.offset_sec) > self.limit
        if too_far:
            if self._too_far is not True:
                log.warning(
                    "%s %s: clock is %.1fs %s Redis's clock, more than %g%% of "
                    "JOB_MISFIRE_GRACE_SEC (%gs): ticks are timed by Redis's clock, but the "
                    "times this host writes (job runs, logs) are off by as much; fix its clock",
                    *self.who(),
                    abs(reading.offset_sec),
                    "ahead of" if reading.offset_sec > 0 else "behind",
                    WARN_FRACTION * 100,
                    self.grace_sec,
                )
        elif self._too_far:
            log.warning("%s %s: clock is back within %gs of Redis's", *self.who(), self.limit)
        self._too_far = too_far

    def who(self) -> tuple[str, str]:
        return self.kind, self.node
