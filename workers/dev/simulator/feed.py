"""The simulated feed: playlists, their calls, positions, the clock, and the billing counters.

Positions (how `pos` and `lastPos` work here)
---------------------------------------------
Every call is published at a moment of the simulator's clock and gets a *position*: the whole
second it was published in (`floor(t)`). A call the simulator makes itself (the generator, or
`publish_call` without `ts`) has `ts` equal to its position; a call published with an explicit
`ts` keeps that `ts` but is still positioned at its publication second (a late upload).

An answer computed at time `now` covers only whole seconds that are complete: positions up to
`C = floor(now) - 1`. A call published later lands in second `floor(now)` or after, so it can
never fall into a second an earlier answer covered (publishing and answering share one lock, and
the clock as seen by the feed never moves back).

    pos=P     calls with P < position <= C, oldest first;      lastPos = C
    init=1    the last 25 calls with position <= C;             lastPos = C
    (neither) calls with C - 300 < position <= C (5 minutes);   lastPos = C, re-reads billed
    serverTime = floor(now)

So a client that always sends `pos=<the last non-zero lastPos it stored>` gets every call
exactly once, and never one twice. With `lastpos_zero_on_empty` (default on, the real service's
quirk) an answer without new calls says `lastPos: 0`; the client must keep its cursor. A `pos`
beyond C gets no calls. There is no page limit: one answer carries every call in its range.

Limited retention (`Faults.max_pos_age = A`): live answers never include a call positioned at
or before `floor(now - A)`; an older `pos` is silently answered from there. `group_archives`
(by `ts`, inclusive `[start, end]`, at most 28,800 s) is not limited.

Calls belong to talkgroups; a playlist is a set of talkgroups, and a call on a talkgroup is in
every playlist that has it. Each playlist's generator publishes Poisson arrivals at its
`calls_per_minute`, from its own seeded RNG, on the simulator's clock: arrivals are made
lazily, in time order, before anything reads or publishes, so a `ManualClock` drives it exactly.

Billing: every call record in a well-formed answer (live, archives) counts once in
`billed_records` and once for that call (`served_count`).
"""

from __future__ import annotations

import json
import math
import random
import threading
import uuid as uuid_mod
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.core import records
from workers.dev.simulator import geo
from workers.dev.simulator.audio import Clip
from workers.dev.simulator.faults import AudioFault, Faults

LIVE_INIT_CALLS = 25
LIVE_DEFAULT_WINDOW_SEC = 300
ARCHIVE_MAX_WINDOW_SEC = 28_800

# Error codes. 103 and 108 are the service's; the others are the simulator's own (the service's
# are not documented), in HTTP's spirit. All arrive as HTTP 200 with an `errors` body.
E_BAD_TOKEN = 103
E_UNKNOWN_KEY = 108
E_BAD_REQUEST = 400
E_LOGIN_FAILED = 401
E_NOT_PUBLIC = 403
E_NOT_FOUND = 404


class ApiError(Exception):
    """An answer of the form {"errors": [{"code": ..., "title": ...}]}."""

    def __init__(self, code: int, title: str, http_status: int = 200) -> None:
        super().__init__(f"{code}: {title}")
        self.code, self.title, self.http_status = code, title, http_status


class PollTooSoon(Exception):
    """A selector polled again within `min_poll_interval`: HTTP 429 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"poll again in {retry_after} s")
        self.retry_after = retry_after


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()  # publish_call(..., url=OMIT) leaves the field out of the record


class ManualClock:
    """A clock the test moves: `clock()` is unix seconds; `advance(s)` moves it forward."""

    def __init__(self, start: float) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds
            return self._now


@dataclass(eq=False)
class Call:
    seq: int
    position: int  # the whole second it was published in
    ts: int  # the ts it was published with (archives select on it)
    group: geo.Group
    record: dict[str, Any]
    body: bytes  # the record as compact JSON, made once: pages of 1,000 join bytes
    audio_key: str
    audio: AudioFault
    clip: Clip
    served: int = 0
    audio_requests: int = 0


class Timeline:
    """Calls in position order, selected by position range with bisect."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.calls: list[Call] = []

    def add(self, call: Call) -> None:
        self.positions.append(call.position)
        self.calls.append(call)

    def select(
        self,
        after: int,
        upto: int,
        match: Callable[[Call], bool] | None = None,
        last: int | None = None,
    ) -> list[Call]:
        """Calls with after < position <= upto (only the last `last` of them, if given)."""
        i = bisect_right(self.positions, after)
        j = bisect_right(self.positions, upto)
        if match is None:
            return self.calls[max(i, j - last) if last else i : j]
        if last is None:
            return [c for c in self.calls[i:j] if match(c)]
        picked: list[Call] = []
        for k in range(j - 1, i - 1, -1):
            if match(self.calls[k]):
                picked.append(self.calls[k])
                if len(picked) == last:
                    break
        picked.reverse()
        return picked


_PLAYLIST_GROUP_KEYS = ("groupId", "descr", "display", "grouping", "tag")
_PUBLIC_PLAYLIST_KEYS = ("uuid", "name", "descr", "ctids", "listeners")


def _pick(source: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: source[k] for k in keys}


@dataclass(eq=False)
class Playlist:
    uuid: str
    name: str
    descr: str
    groups: list[geo.Group]
    public: bool
    ctids: list[int]
    listeners: int
    calls_per_minute: float
    rng: random.Random
    next_arrival: float | None
    timeline: Timeline = field(default_factory=Timeline)

    def as_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "descr": self.descr,
            "public": self.public,
            "listeners": self.listeners,
            "ctids": list(self.ctids),
            "groups": [_pick(geo.camel_json(g), _PLAYLIST_GROUP_KEYS) for g in self.groups],
        }


# A live selector: ("playlist_uuid", uuid) | ("groups", "a,b") | ("sid", "12") | ("nodeId", "5")
Selector = tuple[str, str]


class Feed:
    """All state, behind one lock. The HTTP layer (server.py) calls these methods."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        seed: int,
        faults: Faults,
        audio_base: str,
        clips: list[Clip],
        silence: Clip,
    ) -> None:
        self.faults = faults
        self._clock = clock
        self._seed = seed
        self._rng = random.Random(seed)
        self._audio_base = audio_base
        self._clips, self._silence = clips, silence
        self._lock = threading.RLock()
        self._seen_now = -math.inf
        self._seq = 0
        self._playlists: dict[str, Playlist] = {}
        self._all = Timeline()
        self._by_group: dict[str, list[Call]] = {}
        self._by_identity: dict[tuple[object, object, object], Call] = {}
        self._by_audio_key: dict[str, Call] = {}
        self._previous_answer: dict[tuple[str, Selector], list[Call]] = {}
        self._last_poll: dict[tuple[str, Selector], float] = {}
        self.billed_records = 0

    # --- the clock and the generator --------------------------------------------------------

    def now(self) -> float:
        """The clock, never moving back as the feed sees it; due arrivals are published first."""
        with self._lock:
            t = self._clock()
            if t > self._seen_now:
                self._seen_now = t
            self._publish_due_arrivals(self._seen_now)
            return self._seen_now

    def _publish_due_arrivals(self, now: float) -> None:
        while True:
            due = [
                (p.next_arrival, n, p)
                for n, p in enumerate(self._playlists.values())
                if p.next_arrival is not None and p.next_arrival <= now
            ]
            if not due:
                return
            at, _, playlist = min(due)
            group = playlist.rng.choice(playlist.groups)
            self._publish(math.floor(at), group, ts=None, duration=None, audio=AudioFault.OK)
            playlist.next_arrival = at + playlist.rng.expovariate(playlist.calls_per_minute / 60)

    # --- playlists and publishing -------------------------------------------------------------

    def add_playlist(
        self,
        uuid: str | None,
        name: str,
        groups: list[str] | None,
        public: bool,
        calls_per_minute: float,
        ctids: list[int] | None,
        descr: str | None = None,
    ) -> str:
        if calls_per_minute < 0:
            raise ValueError("calls_per_minute must be >= 0")
        with self._lock:
            now = self.now()
            if uuid is None:
                uuid = str(uuid_mod.UUID(int=self._rng.getrandbits(128), version=4))
            else:
                uuid = str(uuid_mod.UUID(uuid))  # canonical form; a malformed one raises
            if uuid in self._playlists:
                raise ValueError(f"playlist {uuid} exists")
            chosen = [geo.group_for(g) for g in groups] if groups else self._pick_groups()
            rng = random.Random(f"{self._seed}:{uuid}")
            first = now + rng.expovariate(calls_per_minute / 60) if calls_per_minute else None
            self._playlists[uuid] = Playlist(
                uuid=uuid,
                name=name,
                descr=descr if descr is not None else f"{name} (simulated)",
                groups=chosen,
                public=public,
                ctids=list(ctids) if ctids is not None else sorted({g.ctid for g in chosen}),
                listeners=rng.randint(5, 900),
                calls_per_minute=calls_per_minute,
                rng=rng,
                next_arrival=first,
            )
            return uuid

    def _pick_groups(self) -> list[geo.Group]:
        """Three talkgroups of one system, preferring ones no other playlist has."""
        taken = {g.group_id for p in self._playlists.values() for g in p.groups}
        free = [g for g in geo.ROSTER.values() if g.group_id not in taken] or list(
            geo.ROSTER.values()
        )
        system = self._rng.choice(sorted({g.node_id for g in free}))
        pool = [g for g in free if g.node_id == system]
        return self._rng.sample(pool, min(3, len(pool)))

    def publish_call(
        self,
        playlist_uuid: str,
        *,
        group_id: str | None,
        ts: int | None,
        duration: float | None,
        audio: AudioFault,
        fields: Mapping[str, Any],
    ) -> dict[str, Any]:
        with self._lock:
            playlist = self._playlist(playlist_uuid)
            if group_id is None:
                group = self._rng.choice(playlist.groups)
            else:
                matching = [g for g in playlist.groups if g.group_id == group_id]
                if not matching:
                    raise ValueError(f"group {group_id!r} is not in playlist {playlist_uuid}")
                group = matching[0]
            position = math.floor(self.now())
            call = self._publish(
                position, group, ts=ts, duration=duration, audio=audio, fields=fields
            )
            return dict(call.record)

    def _publish(
        self,
        position: int,
        group: geo.Group,
        *,
        ts: int | None,
        duration: float | None,
        audio: AudioFault,
        fields: Mapping[str, Any] | None = None,
    ) -> Call:
        if fields is None:
            fields = {}
        call = self._make_call(position, group, ts, duration, audio, fields)
        self._index(call)
        if self.faults.duplicate_group_ts > 0:
            self.faults.duplicate_group_ts -= 1
            twin_fields = {k: v for k, v in fields.items() if k != "url"}
            twin = self._make_call(position, group, call.ts, duration, audio, twin_fields)
            self._index(twin)
        return call

    def _make_call(
        self,
        position: int,
        group: geo.Group,
        ts: int | None,
        duration: float | None,
        audio: AudioFault,
        fields: Mapping[str, Any],
    ) -> Call:
        self._seq += 1
        if audio is AudioFault.SILENCE:
            clip = self._silence
        else:
            clip = self._clips[(self._seq - 1) % len(self._clips)]
        call_ts = position if ts is None else int(ts)
        seconds = clip.duration if duration is None else float(duration)
        audio_key = f"{self._seq:07d}-{self._rng.getrandbits(40):010x}"
        # The radio's unit id; now and then unknown (0 or -1), as the service serves it.
        src = self._rng.randint(1000, 9_999_999)
        if self._rng.random() < 0.05:
            src = self._rng.choice((-1, 0))
        record: dict[str, Any] = {
            "groupId": group.group_id,
            "ts": call_ts,
            "start_ts": call_ts,
            "end_ts": call_ts + max(1, round(seconds)),
            "duration": seconds,
            "url": f"{self._audio_base}/audio/{audio_key}.m4a",
            "sid": group.sid,
            "siteId": group.site_id,
            "nodeId": group.node_id,
            "feedId": group.feed_id,
            "tgId": group.tg_id,
            "tag": group.tag,
            "freq": group.freq,
            "src": src,
            "descr": group.descr,
            "display": group.display,
            "grouping": group.grouping,
            "size": clip.size,
        }
        for name, value in fields.items():
            if value is OMIT:
                record.pop(name, None)
            else:
                record[name] = value
        body = json.dumps(record, separators=(",", ":")).encode()
        return Call(self._seq, position, call_ts, group, record, body, audio_key, audio, clip)

    def _index(self, call: Call) -> None:
        self._all.add(call)
        for playlist in self._playlists.values():
            if call.group in playlist.groups:
                playlist.timeline.add(call)
        self._by_group.setdefault(call.group.group_id, []).append(call)
        self._by_identity[identity(call.record)] = call
        self._by_audio_key[call.audio_key] = call

    # --- the live endpoint --------------------------------------------------------------------

    def live(
        self,
        selector: Selector,
        *,
        pos: int | None,
        init: bool,
        poller: str,
        as_user: bool,
    ) -> tuple[bytes, int]:
        """The answer's body and how many records it serves (see the module docstring)."""
        with self._lock:
            now = self.now()
            timeline, match = self._timeline_for(selector, as_user)
            self._check_poll_rate((poller, selector), now)
            covered = math.floor(now) - 1
            after = -1
            if self.faults.max_pos_age is not None:
                after = math.floor(now - self.faults.max_pos_age)
            if init:
                new = timeline.select(after, covered, match, last=LIVE_INIT_CALLS)
            elif pos is not None:
                new = timeline.select(max(after, pos), covered, match)
            else:
                new = timeline.select(max(after, covered - LIVE_DEFAULT_WINDOW_SEC), covered, match)
            served = new
            key = (poller, selector)
            if self.faults.reserve_overlap:
                fresh = set(map(id, new))
                served = [c for c in self._previous_answer.get(key, []) if id(c) not in fresh]
                served += new
            self._previous_answer[key] = new
            last_pos = 0 if not new and self.faults.lastpos_zero_on_empty else covered
            self._bill(served)
            head = b'{"serverTime":%d,"lastPos":%d,"calls":[' % (math.floor(now), last_pos)
            return head + b",".join(c.body for c in served) + b"]}", len(served)

    def _timeline_for(
        self, selector: Selector, as_user: bool
    ) -> tuple[Timeline, Callable[[Call], bool] | None]:
        kind, value = selector
        if kind == "playlist_uuid":
            return self._visible_playlist(value, as_user).timeline, None
        if kind == "groups":
            wanted = {g for g in value.split(",") if g}
            if not wanted:
                raise ApiError(E_BAD_REQUEST, "groups: expected comma-separated group ids")
            return self._all, lambda c: c.group.group_id in wanted
        number = whole_number(kind, value)
        if kind == "sid":
            return self._all, lambda c: c.group.sid == number
        return self._all, lambda c: c.group.node_id == number

    def _check_poll_rate(self, key: tuple[str, Selector], now: float) -> None:
        interval = self.faults.min_poll_interval
        last = self._last_poll.get(key)
        if interval > 0 and last is not None and now - last < interval:
            raise PollTooSoon(max(1, math.ceil(interval - (now - last))))
        self._last_poll[key] = now

    # --- other calls methods ------------------------------------------------------------------

    def group_archives(self, group_id: str, start: int, end: int) -> tuple[bytes, int]:
        if end < start:
            raise ApiError(E_BAD_REQUEST, "end is before start")
        if end - start > ARCHIVE_MAX_WINDOW_SEC:
            raise ApiError(E_BAD_REQUEST, f"window over {ARCHIVE_MAX_WINDOW_SEC} seconds")
        with self._lock:
            now = self.now()
            if group_id not in self._by_group and self._find_group(group_id) is None:
                raise ApiError(E_NOT_FOUND, "unknown group")
            calls = [c for c in self._by_group.get(group_id, []) if start <= c.ts <= end]
            calls.sort(key=lambda c: (c.ts, c.seq))
            self._bill(calls)
            head = b'{"serverTime":%d,"start":%d,"end":%d,"calls":[' % (math.floor(now), start, end)
            return head + b",".join(c.body for c in calls) + b"]}", len(calls)

    def playlist_get(self, uuid: str, as_user: bool) -> dict[str, Any]:
        with self._lock:
            return self._visible_playlist(uuid, as_user).as_json()

    def playlists_public(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                _pick(p.as_json(), _PUBLIC_PLAYLIST_KEYS)
                for p in self._playlists.values()
                if p.public
            ]

    def group_get(self, group_id: str) -> dict[str, Any]:
        with self._lock:
            group = self._find_group(group_id)
        if group is None:
            raise ApiError(E_NOT_FOUND, "unknown group")
        return geo.camel_json(group)

    def node_get(self, node_id: int) -> dict[str, Any]:
        if node_id not in geo.NODES:
            raise ApiError(E_NOT_FOUND, "unknown node")
        return geo.camel_json(geo.NODES[node_id])

    # --- audio, counters, inspection ----------------------------------------------------------

    def audio_call(self, audio_key: str) -> Call | None:
        with self._lock:
            call = self._by_audio_key.get(audio_key)
            if call is not None:
                call.audio_requests += 1
            return call

    def _bill(self, calls: Iterable[Call]) -> None:
        n = 0
        for call in calls:
            call.served += 1
            n += 1
        self.billed_records += n

    def served_count(self, call: Mapping[str, Any] | str) -> int:
        """How many times a call was served; `call` is its record (or its url)."""
        with self._lock:
            if isinstance(call, str):
                found = next((c for c in self._all.calls if c.record.get("url") == call), None)
            else:
                found = self._by_identity.get(identity(call))
            if found is None:
                raise KeyError(f"not a call the simulator published: {call!r}")
            return found.served

    def calls(self, playlist_uuid: str) -> list[dict[str, Any]]:
        with self._lock:
            self.now()
            return [dict(c.record) for c in self._playlist(playlist_uuid).timeline.calls]

    def reset_counters(self) -> None:
        with self._lock:
            self.billed_records = 0
            for call in self._all.calls:
                call.served = 0
                call.audio_requests = 0

    def stats(self, per_call: bool = False) -> dict[str, Any]:
        with self._lock:
            self.now()
            calls = self._all.calls
            out: dict[str, Any] = {
                "billed_records": self.billed_records,
                "calls_published": len(calls),
                "calls_served": sum(1 for c in calls if c.served),
                "calls_served_more_than_once": sum(1 for c in calls if c.served > 1),
                "audio_requests": sum(c.audio_requests for c in calls),
                "playlists": {u: len(p.timeline.calls) for u, p in self._playlists.items()},
            }
            if per_call:
                out["served"] = {c.record.get("url", c.audio_key): c.served for c in calls}
            return out

    def _playlist(self, uuid: str, not_found: Exception | None = None) -> Playlist:
        playlist = self._playlists.get(uuid)
        if playlist is None:
            raise not_found or KeyError(f"no playlist {uuid}")
        return playlist

    def _visible_playlist(self, uuid: str, as_user: bool) -> Playlist:
        """The playlist, if it exists and is public or the caller acts as a user."""
        playlist = self._playlist(uuid, not_found=ApiError(E_NOT_FOUND, "unknown playlist"))
        if not playlist.public and not as_user:
            raise ApiError(E_NOT_PUBLIC, "playlist is not public: authenticate as a user")
        return playlist

    def _find_group(self, group_id: str) -> geo.Group | None:
        """A group of some playlist, else the roster's, else None (call with the lock held)."""
        for p in self._playlists.values():
            for g in p.groups:
                if g.group_id == group_id:
                    return g
        return geo.ROSTER.get(group_id)


def identity(record: Mapping[str, Any]) -> tuple[object, object, object]:
    """How the simulator tells calls apart: groupId, ts and the call's own audio url."""
    return (record.get("groupId"), record.get("ts"), record.get("url"))


def whole_number(name: str, value: str, expected: str = "a whole number") -> int:
    """`value` as a non-negative integer, else ApiError 400 titled "<name>: expected <expected>".
    Strict (no sign, no white space), and never an exception of int()'s ("¹²" is a digit to
    str.isdigit() only)."""
    try:
        if value.isdigit():
            return records.whole_number(value, name, 0)
    except records.BadValue:
        pass
    raise ApiError(E_BAD_REQUEST, f"{name}: expected {expected}")
