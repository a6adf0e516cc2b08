"""The singleton lock: `max_instances=1` across any number of workers and hosts.

A lock is one Redis key holding the holder's token (`workers.core.identity`: the holding
process and a part unique to the run), set with `SET NX PX`. While the holder runs, a
background thread "extends to" the TTL every renewal period, checking the token first; if the
key is gone or holds another token, the holder has lost it and is told so at once. Release is
a token-checked compare-and-delete, so a holder can never delete a lock that
expired and was taken by someone else (the mistake of a plain DEL).

Acquire and release are one Lua script each: one Redis round trip apiece per run. The acquire
script also
  * drops a beat tick that is late: one that waited longer than its grace since beat sent it,
    both times read from Redis's clock (`TIME`), so hosts whose clocks disagree still agree on
    what is late; late ticks are counted per job;
  * skips a duplicate beat tick (two beat processes running by mistake): each tick carries its
    schedule slot; a slot that already ran is skipped, even after the earlier run released;
  * counts skipped runs per job;
  * for a trigger (not a tick) that finds the lock held, leaves a "run again" request, which the
    holder's release script turns into one more pass, so a wake-up is never lost.

Keys share a hash tag per job (`{bcfy:job:<name>}`), so the scripts stay valid on Redis Cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import redis

from workers.core.identity import unique_token

log = logging.getLogger(__name__)

KEY_PREFIX = "bcfy:job"

# KEYS: lock, last tick slot, skip counter, rerun request, late tick counter
# ARGV: token, ttl ms, tick slot ('' when not a tick), tick key ttl ms, is trigger ('1'/'0'),
#       tick sent at (Redis ms, '' when not a tick), tick grace ms
# Returns {1, ''} acquired | {0, holder} held by holder | {2, slot} duplicate tick
#       | {3, waited ms} late tick (by Redis's clock)
_ACQUIRE = """
if ARGV[6] ~= '' then
  local t = redis.call('TIME')
  local waited = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[6])
  if waited > tonumber(ARGV[7]) then
    redis.call('INCR', KEYS[5])
    return {3, tostring(waited)}
  end
end
local slot = ARGV[3]
if slot ~= '' then
  local last = redis.call('GET', KEYS[2])
  if last and tonumber(last) >= tonumber(slot) then
    redis.call('INCR', KEYS[3])
    return {2, last}
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if slot ~= '' then
    redis.call('SET', KEYS[2], slot, 'PX', ARGV[4])
  end
  return {1, ''}
end
redis.call('INCR', KEYS[3])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""

# KEYS: lock ; ARGV: token, ttl ms  -> 1 extended, 0 not ours any more
_EXTEND_TO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, rerun request ; ARGV: token, ttl ms, allow continue ('1'/'0')
# Returns 1 released | 2 kept for one more pass (a trigger arrived) | 0 was not ours
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] == '1' and redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 2
end
redis.call('DEL', KEYS[1])
return 1
"""


class Acquired(Enum):
    YES = "acquired"
    HELD = "held"  # another run holds the lock
    DUPLICATE_TICK = "duplicate_tick"  # this beat slot already ran
    LATE = "late"  # a tick that waited longer than its grace (by Redis's clock)


class Released(Enum):
    RELEASED = "released"
    RUN_AGAIN = "run_again"  # still held: a trigger asked for one more pass
    NOT_OURS = "not_ours"  # expired or taken: we had lost it


@dataclass(frozen=True)
class AcquireResult:
    outcome: Acquired
    holder: str = ""  # the holding run's token (or the last tick slot, or ms a tick waited)

    def __bool__(self) -> bool:
        return self.outcome is Acquired.YES


def job_keys(job: str) -> tuple[str, str, str, str, str]:
    """lock, last tick slot, skip counter, rerun request, late tick counter"""
    base = f"{KEY_PREFIX}:{{{job}}}"
    return f"{base}:lock", f"{base}:last_tick", f"{base}:skips", f"{base}:rerun", f"{base}:late"


class SingletonLock:
    """One job's lock. Not reentrant; one instance per run.

    `on_lost` is called (from the renewal thread) when a renewal finds the lock gone or taken,
    or when renewals keep failing until the TTL must have run out.
    """

    def __init__(
        self,
        client: redis.Redis,
        job: str,
        *,
        ttl: float = 30.0,
        renew_every: float | None = None,
        token: str | None = None,
        on_lost: Callable[[], object] | None = None,
    ) -> None:
        self.client = client
        self.job = job
        self.ttl_ms = int(ttl * 1000)
        self.renew_every = renew_every if renew_every is not None else ttl / 3
        self.token = token or unique_token()
        self.on_lost = on_lost
        self.lock_key, self.tick_key, self.skips_key, self.rerun_key, self.late_key = job_keys(job)
        self._acquire = client.register_script(_ACQUIRE)
        self._extend = client.register_script(_EXTEND_TO)
        self._release = client.register_script(_RELEASE)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.renewals = 0

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def acquire(
        self,
        *,
        tick_slot: int | None = None,
        tick_ttl: float = 0.0,
        trigger: bool = False,
        tick_sent_ms: int | None = None,
        tick_grace: float = 0.0,
    ) -> AcquireResult:
        """tick_sent_ms: when beat sent the tick, by Redis's clock; a tick that waited longer
        than tick_grace seconds by Redis's clock now is LATE and takes nothing."""
        keys = [self.lock_key, self.tick_key, self.skips_key, self.rerun_key, self.late_key]
        args: list[str | int] = [
            self.token,
            self.ttl_ms,
            "" if tick_slot is None else str(tick_slot),
            max(int(tick_ttl * 1000), self.ttl_ms),
            "1" if trigger else "0",
            "" if tick_sent_ms is None else str(int(tick_sent_ms)),
            int(tick_grace * 1000),
        ]
        code, detail = self._acquire(keys=keys, args=args)
        detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        if code == 1:
            self._lost.clear()
            return AcquireResult(Acquired.YES)
        if code == 2:
            return AcquireResult(Acquired.DUPLICATE_TICK, detail)
        if code == 3:
            return AcquireResult(Acquired.LATE, detail)
        return AcquireResult(Acquired.HELD, detail)

    def extend(self) -> bool:
        """Reset the TTL to its full length if we still hold the lock."""
        return bool(self._extend(keys=[self.lock_key], args=[self.token, self.ttl_ms]))

    def release(self, *, allow_run_again: bool = False) -> Released:
        """Compare-and-delete. With allow_run_again, a pending trigger keeps the lock for us."""
        self.stop_renewing()
        code = self._release(
            keys=[self.lock_key, self.rerun_key],
            args=[self.token, self.ttl_ms, "1" if allow_run_again else "0"],
        )
        if code == 2:
            return Released.RUN_AGAIN
        return Released.RELEASED if code == 1 else Released.NOT_OURS

    # --- background renewal ------------------------------------------------------------

    def start_renewing(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"lock-renew:{self.job}", daemon=True
        )
        self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=5)

    def _renew_loop(self) -> None:
        # The lock is surely ours until last_ok + ttl; past that, another run may hold it.
        last_ok = time.monotonic()
        wait = self.renew_every
        while not self._stop.wait(wait):
            try:
                still_ours = self.extend()
            except redis.RedisError as exc:
                expires_in = last_ok + self.ttl_ms / 1000 - time.monotonic()
                if expires_in > 0:
                    log.warning("lock %s: renewal failed (%s); retrying", self.job, exc)
                    wait = min(self.renew_every, max(expires_in / 3, 0.05))
                    continue
                still_ours = False
            if not still_ours:
                self._mark_lost()
                return
            self.renewals += 1
            last_ok = time.monotonic()
            wait = self.renew_every

    def _mark_lost(self) -> None:
        self._lost.set()
        log.error(
            "lock %s lost by %s: stopping the run before it writes more", self.job, self.token
        )
        if self.on_lost is not None:
            self.on_lost()


def holder_of(client: redis.Redis, job: str) -> str | None:
    """Who holds a job's lock right now (for status output)."""
    value = client.get(job_keys(job)[0])
    return value.decode() if isinstance(value, bytes) else value


def skip_count(client: redis.Redis, job: str) -> int:
    value = client.get(job_keys(job)[2])
    return int(value or 0)


def late_count(client: redis.Redis, job: str) -> int:
    """How many of a job's ticks were dropped for waiting longer than their grace."""
    value = client.get(job_keys(job)[4])
    return int(value or 0)
