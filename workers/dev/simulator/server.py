"""The simulator's HTTP side: routing, JWT checks, injected faults, audio, and the control surface.

Authentication, on every API path (not on /audio, not on /_sim):
- No `Authorization` header, or not `Bearer <token>`: HTTP 401 with error 103.
- The token's header must name a known key id in `kid` (else error 108) and use HS256; its
  signature must verify with that key's secret and `iss` must be its app id; `exp` must be
  present, in the future and at most 24 h ahead by the simulator's clock; `iat` must be present.
  Any of these wrong, or a token that does not parse: error 103.
- `sub` (the uid, an integer) and `utk` (the token from POST /common/v1/auth) come together or
  not at all, and must name a live login (else 103). They are needed for non-public playlists
  (else error 403).
All errors but the 401 are HTTP 200 with {"errors": [{"code": N, "title": "..."}]}, as the
service answers; codes besides 103 and 108 are the simulator's own (see feed.py).

Injected faults (Faults) are applied to API paths in this order, before authentication:
latency, 429, 500, error in a 200, malformed JSON. A selector polled again by the same key id
within `min_poll_interval` (5 s) gets HTTP 429 with Retry-After (not billed).

Every live poll and archive read is logged with its arrival time before anything else happens
to it (faulted and refused requests too): `arrivals("playlist_uuid=<uuid>")`,
`arrivals("group=<groupId>")`, so a test can check the spacing the service sees.

/_sim/... is a test and demo control surface, unauthenticated, and exists only on the
simulator: GET /_sim/stats[?calls=1], GET|POST /_sim/faults (JSON of Faults fields),
POST /_sim/publish, POST /_sim/playlists, GET /_sim/calls?playlist_uuid=, POST /_sim/reset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from aiohttp import web

from workers.core.settings import is_loopback_host
from workers.dev.http_server import BackgroundServer
from workers.dev.simulator import geo
from workers.dev.simulator.audio import WRONG_TYPE_PAGE, load_clips, oversize_stream, truncated
from workers.dev.simulator.faults import INTERNAL_REDIRECT_TARGET, AudioFault, Faults
from workers.dev.simulator.feed import (
    E_BAD_REQUEST,
    E_BAD_TOKEN,
    E_LOGIN_FAILED,
    E_NOT_FOUND,
    E_UNKNOWN_KEY,
    OMIT,
    ApiError,
    Feed,
    PollTooSoon,
    Selector,
    whole_number,
)

log = logging.getLogger("workers.dev.simulator")

# Demo credentials (`bcfy sim`, tests): not secrets. The secret is 32+ bytes, as HS256 wants.
DEMO_API_KEYS: dict[str, tuple[str, str]] = {
    "demo-key": ("demo-secret-for-the-feed-simulator", "demo-app")
}
DEMO_USERS: dict[str, tuple[str, int]] = {"demo": ("demo", 1001)}

SERVER_NAME = "bcfy-sim/1"  # the Server header
MAX_TOKEN_LIFETIME_SEC = 86_400
LIVE_SELECTORS = ("playlist_uuid", "sid", "nodeId", "groups")
# What a number in a path or query parameter is expected to be (the error's title says it).
_SECONDS_OR_ID = "a whole number of seconds or an id"


@dataclasses.dataclass(frozen=True)
class Principal:
    kid: str
    uid: int | None  # set when the token acts as a user


Headers = Mapping[str, str]  # a request's (aiohttp's CIMultiDictProxy[str] is one)


class _Answer:
    """What a route returns: status, body, headers, and how many call records it serves."""

    def __init__(
        self,
        body: bytes | Iterable[bytes],
        status: int = 200,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        records: int = 0,
        length: int | None = -1,  # -1: len(body); None: unknown, sent chunked
    ) -> None:
        self.body, self.status, self.content_type = body, status, content_type
        self.headers = dict(headers or {})
        self.records = records
        self.length = len(body) if length == -1 and isinstance(body, bytes) else length


def _json(value: Any, status: int = 200) -> _Answer:
    return _Answer(json.dumps(value, separators=(",", ":")).encode(), status)


def _error(code: int, title: str, status: int = 200) -> _Answer:
    return _json({"errors": [{"code": code, "title": title}]}, status)


_API_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("GET", r"^/calls/v1/live/?$", "live"),
        ("GET", r"^/calls/v1/playlist_get/?$", "playlist_get"),
        ("GET", r"^/calls/v1/playlists_public/?$", "playlists_public"),
        ("GET", r"^/calls/v1/group_archives/([^/]+)/([^/]+)/([^/]+)/?$", "group_archives"),
        ("GET", r"^/calls/v1/group_get/([^/]+)/?$", "group_get"),
        ("GET", r"^/calls/v1/node_get/([^/]+)/?$", "node_get"),
        ("POST", r"^/common/v1/auth/?$", "auth"),
        ("GET", r"^/common/v1/countries/?$", "countries"),
        ("GET", r"^/common/v1/states/([^/]+)/?$", "states"),
        ("GET", r"^/common/v1/counties/([^/]+)/?$", "counties"),
        ("GET", r"^/common/v1/county/([^/]+)/?$", "county"),
    ]
]
_AUDIO_PATH = re.compile(r"^/audio/(r/)?([0-9a-f-]+)\.m4a$")


class FeedSimulator:
    """A Broadcastify-compatible server on 127.0.0.1 (by default), for tests and demo mode."""

    def __init__(
        self,
        api_keys: Mapping[str, tuple[str, str]] | None = None,
        users: Mapping[str, tuple[str, int]] | None = None,
        clock: Callable[[], float] | None = None,
        seed: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_host: str | None = None,
    ) -> None:
        """`public_host`: the address the pipeline reaches it by, when not `host` (a server
        listening on 0.0.0.0 for containers, which reach it by their network's gateway)."""
        self.api_keys = dict(DEMO_API_KEYS if api_keys is None else api_keys)
        self.users = dict(DEMO_USERS if users is None else users)
        self.clock = clock or time.time
        self.faults = Faults()
        self._http = BackgroundServer(self._serve, host=host, port=port, name="bcfy-sim")
        self.audio_host = f"{public_host or host}:{self._http.port}"
        self.url = f"http://{self.audio_host}"
        clips, silence = load_clips()
        self._feed = Feed(
            clock=self.clock,
            seed=seed,
            faults=self.faults,
            audio_base=self.url,
            clips=clips,
            silence=silence,
        )
        self._logins: dict[str, int] = {}  # utk -> uid
        self._fault_lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self._arrivals: dict[str, list[float]] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> FeedSimulator:
        self._http.start()
        # Drives the generator in real time, so calls appear (and are logged) as they happen;
        # every request also catches up, so a ManualClock needs no ticker.
        ticker = threading.Thread(target=self._tick, name="bcfy-sim-clock", daemon=True)
        self._threads = [ticker]
        ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stopping.wait(0.2):
            self._feed.now()

    def stop(self) -> None:
        self._stopping.set()
        self._http.stop()  # kept-alive connections end with the server, not with their client
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> FeedSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the Python API ---------------------------------------------------------------------

    def add_playlist(
        self,
        uuid: str | None = None,
        name: str = "Simulated playlist",
        groups: list[str] | None = None,
        public: bool = True,
        calls_per_minute: float = 0.0,
        ctids: list[int] | None = None,
        descr: str | None = None,
    ) -> str:
        return self._feed.add_playlist(uuid, name, groups, public, calls_per_minute, ctids, descr)

    def publish_call(
        self,
        playlist_uuid: str,
        *,
        group_id: str | None = None,
        ts: int | None = None,
        duration: float | None = None,
        audio: AudioFault = AudioFault.OK,
        **fields: Any,
    ) -> dict[str, Any]:
        """One call, visible from now (from the next complete second); the record as served.
        `fields` override the record's fields; a field set to OMIT is left out."""
        return self._feed.publish_call(
            playlist_uuid, group_id=group_id, ts=ts, duration=duration, audio=audio, fields=fields
        )

    def pipeline_env(self) -> dict[str, str]:
        """The settings that point a pipeline at this simulator: its API with the demo key,
        and its audio host, which is on loopback or a test network (workers.dev.hosts), so
        downloads must be allowed to go there, and plain http to it too."""
        kid, (secret, app_id) = next(iter(self.api_keys.items()))
        address = self.audio_host.rsplit(":", 1)[0]
        return {
            "BCFY_API_BASE": self.url,
            "BCFY_API_KEY_ID": kid,
            "BCFY_API_KEY": secret,
            "BCFY_APP_ID": app_id,
            "AUDIO_ALLOWED_HOSTS": self.audio_host,
            "AUDIO_ALLOWED_INTERNAL_NETWORKS": f"{address}/32",
            **({} if is_loopback_host(address) else {"BCFY_ALLOW_INSECURE_HTTP": "true"}),
        }

    @property
    def billed_records(self) -> int:
        return self._feed.billed_records

    def served_count(self, call: Mapping[str, Any] | str) -> int:
        return self._feed.served_count(call)

    def calls(self, playlist_uuid: str) -> list[dict[str, Any]]:
        return self._feed.calls(playlist_uuid)

    def reset_counters(self) -> None:
        self._feed.reset_counters()
        self.requests.clear()
        with self._fault_lock:
            self._arrivals.clear()

    def arrivals(self, selector: str) -> list[float]:
        """When (time.monotonic()) each request for `selector` arrived, oldest first: live
        polls as "playlist_uuid=<uuid>" (or sid=, nodeId=, groups=), archive reads as
        "group=<groupId>"; faulted and refused requests included."""
        with self._fault_lock:
            return list(self._arrivals.get(selector, []))

    def stats(self, per_call: bool = False) -> dict[str, Any]:
        return {**self._feed.stats(per_call), "requests": dict(self.requests)}

    # --- request handling -------------------------------------------------------------------

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's handler: the answer is made in a thread of its own (handle_* may block:
        latency, a test holding a request back), then sent from here."""
        started = time.perf_counter()
        parts = urlsplit(request.raw_path)
        query = parse_qs(parts.query, keep_blank_values=True)
        body = await request.read()
        try:
            answer = await self._http.in_thread(
                self._answer, request.method, parts.path, query, request.headers, body
            )
        except Exception:
            log.exception("simulator error on %s %s", request.method, request.raw_path)
            answer = _Answer(b"simulator error\n", 500, "text/plain")
        response = await _send(request, answer)
        elapsed = (time.perf_counter() - started) * 1000
        log.info(
            "%s %s -> %d%s %.1f ms",
            request.method,
            request.raw_path,
            answer.status,
            f" {answer.records} records" if answer.records else "",
            elapsed,
        )
        return response

    def _answer(
        self, method: str, path: str, query: dict[str, list[str]], headers: Headers, body: bytes
    ) -> _Answer:
        if path.startswith("/audio/"):
            return self.handle_audio(path)
        if path.startswith("/_sim/"):
            return self.handle_control(method, path, query, body)
        return self.handle_api("GET" if method == "HEAD" else method, path, query, headers, body)

    def handle_api(
        self, method: str, path: str, query: dict[str, list[str]], headers: Headers, body: bytes
    ) -> _Answer:
        route = None
        for route_method, pattern, name in _API_ROUTES:
            match = pattern.match(path)
            if match:
                if route_method != method:
                    return _error(E_BAD_REQUEST, f"use {route_method}", 405)
                route = (name, match.groups())
                break
        if route is None:
            return _error(E_NOT_FOUND, "no such method", 404)
        name, args = route
        self.count(name)
        self._log_arrival(name, query, args)
        if self.faults.latency > 0:
            time.sleep(self.faults.latency)
        injected = self._take_injected_fault()
        if injected is not None:
            return injected
        try:
            principal = self._authenticate(headers.get("Authorization"))
            handler: Callable[..., _Answer] = getattr(self, f"_api_{name}")
            return handler(principal, query, body, *args)
        except ApiError as exc:
            return _error(exc.code, exc.title, exc.http_status)
        except PollTooSoon as exc:
            self.count("poll_too_soon")
            answer = _error(429, "polled too soon", 429)
            answer.headers["Retry-After"] = str(exc.retry_after)
            return answer

    def count(self, what: str) -> None:
        with self._fault_lock:
            self.requests[what] += 1

    def _log_arrival(self, name: str, query: dict[str, list[str]], args: tuple[str, ...]) -> None:
        arrived = time.monotonic()
        if name == "live":
            chosen = [f"{k}={query[k][0]}" for k in LIVE_SELECTORS if query.get(k)]
        elif name == "group_archives":
            chosen = [f"group={unquote(args[0])}"]
        else:
            return
        with self._fault_lock:
            for selector in chosen:
                self._arrivals.setdefault(selector, []).append(arrived)

    def _take_injected_fault(self) -> _Answer | None:
        f = self.faults
        with self._fault_lock:
            if f.fail_next_429 > 0:
                f.fail_next_429 -= 1
                answer = _error(429, "too many requests", 429)
                answer.headers["Retry-After"] = str(f.retry_after)
                return answer
            if f.fail_next_500 > 0:
                f.fail_next_500 -= 1
                page = b"<html><body><h1>500 Internal Server Error</h1></body></html>"
                return _Answer(page, 500, "text/html")
            if f.error_in_200 > 0:
                f.error_in_200 -= 1
                return _error(f.error_in_200_code, "injected error")
            if f.malformed_json_next > 0:
                f.malformed_json_next -= 1
                return _Answer(b'{"serverTime":1700000000,"lastPos":17000', 200)
        return None

    def _authenticate(self, header: str | None) -> Principal:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(E_BAD_TOKEN, "missing bearer token", http_status=401)
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise ApiError(E_BAD_TOKEN, "malformed token") from None
        if not isinstance(kid, str) or kid not in self.api_keys:
            raise ApiError(E_UNKNOWN_KEY, "unknown API key id")
        secret, app_id = self.api_keys[kid]
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                issuer=app_id,
                # exp against the simulator's clock, below; sub is an integer here.
                options={
                    "require": ["exp", "iat", "iss"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_sub": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise ApiError(E_BAD_TOKEN, f"invalid token: {exc}") from None
        exp, iat = claims["exp"], claims["iat"]
        if not _is_number(exp) or not _is_number(iat):
            raise ApiError(E_BAD_TOKEN, "exp and iat must be numbers")
        now = self._feed.now()
        if exp <= now:
            raise ApiError(E_BAD_TOKEN, "token expired")
        if exp > now + MAX_TOKEN_LIFETIME_SEC:
            raise ApiError(E_BAD_TOKEN, "token lifetime over 24 hours")
        return Principal(kid, self._user_of(claims))

    def _user_of(self, claims: Mapping[str, Any]) -> int | None:
        if "sub" not in claims and "utk" not in claims:
            return None
        sub, utk = claims.get("sub"), claims.get("utk")
        if isinstance(sub, bool) or not isinstance(sub, int) or not isinstance(utk, str):
            raise ApiError(E_BAD_TOKEN, "sub (integer uid) and utk (user token) go together")
        if self._logins.get(utk) != sub:
            raise ApiError(E_BAD_TOKEN, "unknown user token")
        return sub

    # --- API methods ------------------------------------------------------------------------

    def _api_live(self, who: Principal, query: dict[str, list[str]], body: bytes) -> _Answer:
        _only_params(query, {*LIVE_SELECTORS, "pos", "init"})
        chosen = [k for k in LIVE_SELECTORS if k in query]
        if len(chosen) != 1:
            raise ApiError(E_BAD_REQUEST, f"exactly one of {', '.join(LIVE_SELECTORS)}")
        selector: Selector = (chosen[0], _single(query, chosen[0]))
        if "pos" in query and "init" in query:
            raise ApiError(E_BAD_REQUEST, "pos and init exclude each other")
        pos = whole_number("pos", _single(query, "pos"), _SECONDS_OR_ID) if "pos" in query else None
        if "init" in query and _single(query, "init") != "1":
            raise ApiError(E_BAD_REQUEST, "init: expected 1")
        page, records = self._feed.live(
            selector, pos=pos, init="init" in query, poller=who.kid, as_user=who.uid is not None
        )
        return _Answer(page, records=records)

    def _api_playlist_get(
        self, who: Principal, query: dict[str, list[str]], body: bytes
    ) -> _Answer:
        _only_params(query, {"uuid"})
        if "uuid" not in query:
            raise ApiError(E_BAD_REQUEST, "uuid is required")
        return _json(self._feed.playlist_get(_single(query, "uuid"), who.uid is not None))

    def _api_playlists_public(
        self, who: Principal, query: dict[str, list[str]], body: bytes
    ) -> _Answer:
        return _json({"playlists": self._feed.playlists_public()})

    def _api_group_archives(
        self, who: Principal, query: dict[str, list[str]], body: bytes, gid: str, a: str, b: str
    ) -> _Answer:
        start = whole_number("start", a, _SECONDS_OR_ID)
        end = whole_number("end", b, _SECONDS_OR_ID)
        page, records = self._feed.group_archives(gid, start, end)
        return _Answer(page, records=records)

    def _api_group_get(
        self, who: Principal, query: dict[str, list[str]], body: bytes, gid: str
    ) -> _Answer:
        return _json(self._feed.group_get(gid))

    def _api_node_get(
        self, who: Principal, query: dict[str, list[str]], body: bytes, nid: str
    ) -> _Answer:
        return _json(self._feed.node_get(whole_number("nodeId", nid, _SECONDS_OR_ID)))

    def _api_auth(self, who: Principal, query: dict[str, list[str]], body: bytes) -> _Answer:
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        username, password = _single(form, "username"), _single(form, "password")
        if not username or not password:
            raise ApiError(E_BAD_REQUEST, "username and password are required (form fields)")
        user = self.users.get(username)
        if user is None or not secrets.compare_digest(user[0], password):
            raise ApiError(E_LOGIN_FAILED, "bad username or password")
        token = secrets.token_hex(16)
        self._logins[token] = user[1]
        return _json({"uid": user[1], "token": token})

    def _geo_list(self, key: str, items: list[dict[str, Any]]) -> _Answer:
        wrapper = "data" if self.faults.geo_wrapper == "data" else key
        return _json({wrapper: items})

    def _api_countries(self, who: Principal, query: dict[str, list[str]], body: bytes) -> _Answer:
        return self._geo_list("countries", geo.COUNTRIES)

    def _api_states(
        self, who: Principal, query: dict[str, list[str]], body: bytes, coid: str
    ) -> _Answer:
        return self._geo_children("states", geo.states_of, "coid", coid, "unknown country")

    def _api_counties(
        self, who: Principal, query: dict[str, list[str]], body: bytes, stid: str
    ) -> _Answer:
        return self._geo_children("counties", geo.counties_of, "stid", stid, "unknown state")

    def _geo_children(
        self,
        key: str,
        children_of: Callable[[int], list[dict[str, Any]] | None],
        parent_name: str,
        parent_id: str,
        unknown: str,
    ) -> _Answer:
        """The list of `key` under one parent (a country's states, a state's counties)."""
        children = children_of(whole_number(parent_name, parent_id, _SECONDS_OR_ID))
        if children is None:
            raise ApiError(E_NOT_FOUND, unknown)
        return self._geo_list(key, children)

    def _api_county(
        self, who: Principal, query: dict[str, list[str]], body: bytes, ctid: str
    ) -> _Answer:
        detail = geo.COUNTY_DETAILS.get(whole_number("ctid", ctid, _SECONDS_OR_ID))
        if detail is None:
            raise ApiError(E_NOT_FOUND, "unknown county")
        return _json(detail)

    # --- audio ------------------------------------------------------------------------------

    def handle_audio(self, path: str) -> _Answer:
        match = _AUDIO_PATH.match(path)
        call = self._feed.audio_call(match.group(2)) if match else None
        self.count("audio")
        if call is None or not match:
            return _Answer(b"not found\n", 404, "text/plain")
        fault = AudioFault.OK if match.group(1) else call.audio  # /audio/r/: a redirect's target
        clip = call.clip
        if fault in (AudioFault.OK, AudioFault.SILENCE):
            return _Answer(clip.data, content_type="audio/mp4")
        if fault is AudioFault.TRUNCATED:
            return _Answer(truncated(clip), content_type="audio/mp4")
        if fault is AudioFault.MISSING:
            return _Answer(b"not found\n", 404, "text/plain")
        if fault is AudioFault.WRONG_TYPE:
            return _Answer(WRONG_TYPE_PAGE, content_type="text/html; charset=utf-8")
        if fault in (AudioFault.OVERSIZE, AudioFault.OVERSIZE_UNDECLARED):
            total = self.faults.oversize_bytes
            length = total if fault is AudioFault.OVERSIZE else None
            return _Answer(oversize_stream(clip, total), content_type="audio/mp4", length=length)
        target = (
            INTERNAL_REDIRECT_TARGET
            if fault is AudioFault.REDIRECT_INTERNAL
            else f"{self.url}/audio/r/{call.audio_key}.m4a"
        )
        return _Answer(b"", 302, "text/plain", headers={"Location": target})

    # --- the control surface (/_sim) --------------------------------------------------------

    def handle_control(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> _Answer:
        try:
            data = json.loads(body) if body else {}
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            if (method, path) == ("GET", "/_sim/stats"):
                return _json(self.stats(per_call=_single(query, "calls") == "1"))
            if path == "/_sim/faults" and method in ("GET", "POST"):
                if method == "POST":
                    self.faults.update(data)
                return _json(self.faults.as_dict())
            if (method, path) == ("POST", "/_sim/publish"):
                return _json(self._control_publish(data))
            if (method, path) == ("POST", "/_sim/playlists"):
                return _json({"uuid": self.add_playlist(**data)})
            if (method, path) == ("GET", "/_sim/calls"):
                return _json({"calls": self.calls(_single(query, "playlist_uuid"))})
            if (method, path) == ("POST", "/_sim/reset"):
                self.reset_counters()
                return _json({"ok": True})
        except (ValueError, TypeError, KeyError) as exc:
            return _error(E_BAD_REQUEST, str(exc), 400)
        return _error(E_NOT_FOUND, "no such control", 404)

    def _control_publish(self, data: dict[str, Any]) -> dict[str, Any]:
        known = {"playlist_uuid", "group_id", "ts", "duration", "audio", "fields", "omit"}
        if unknown := set(data) - known:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        fields = dict(data.get("fields") or {})
        fields.update(dict.fromkeys(data.get("omit") or [], OMIT))
        return self.publish_call(
            data["playlist_uuid"],
            group_id=data.get("group_id"),
            ts=data.get("ts"),
            duration=data.get("duration"),
            audio=AudioFault(data.get("audio", "ok")),
            **fields,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _single(query: Mapping[str, list[str]], name: str) -> str:
    values = query.get(name, [""])
    if len(values) != 1:
        raise ApiError(E_BAD_REQUEST, f"{name} given more than once")
    return values[0]


def _only_params(query: Mapping[str, list[str]], allowed: set[str]) -> None:
    if unknown := set(query) - allowed:
        raise ApiError(E_BAD_REQUEST, f"unknown parameter {sorted(unknown)[0]!r}")


async def _send(request: web.BaseRequest, answer: _Answer) -> web.StreamResponse:
    headers = {"Server": SERVER_NAME, "Content-Type": answer.content_type, **answer.headers}
    if isinstance(answer.body, bytes):
        return web.Response(status=answer.status, body=answer.body, headers=headers)
    response = web.StreamResponse(status=answer.status, headers=headers)
    if answer.length is None:
        response.enable_chunked_encoding()
    else:
        response.content_length = answer.length
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    try:
        for chunk in answer.body:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client hung up (a size limit, say): fine
    return response
