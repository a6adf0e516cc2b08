"""The one Broadcastify API client: tokens, timeouts, retries and error handling for every job.

    api = Runtime.current().bcfy_api          # one per process, on the process's httpx client
    page = await api.live_calls(uuid, pos=cursor)

Tokens: an HS256 JWT signed with the API key secret (header `kid` = key id, claim `iss` = app
id), made with PyJWT, cached and checked before every request: a token within
BCFY_JWT_RENEW_MARGIN_SEC of its expiry is replaced first. With BCFY_USERNAME/BCFY_PASSWORD set,
the client logs in once (`/common/v1/auth`, app-only token) and adds `sub`/`utk` to its tokens.

Errors (all subclasses of BroadcastifyError; `status` is the HTTP status when one came back):
  * TransientError - timeouts, connection errors, the transient statuses (429, 5xx, ... as
    workers.clients.http classifies them; their Retry-After honoured). Retried with
    tenacity: exponential backoff with jitter, at most BCFY_RETRY_ATTEMPTS attempts, none
    started after BCFY_RETRY_BUDGET_SEC, so a request with its retries fits inside one run.
  * ConfigurationError - error 108 (unknown key id), missing credentials, a rejected login.
    Never retried: only the operator can fix it.
  * TokenRejected - error 103 (bad signature or exp) again after one fresh token.
  * BroadcastifyError - any other non-2xx, a body that is not JSON, an error in a 200 answer,
    an answer over BCFY_MAX_RESPONSE_BYTES (streamed, and not read past the cap), an envelope
    field (lastPos, serverTime) that is not a whole number. Never retried.

The 5-second rule ("poll a selector no more often than every 5 s"). Every request to a live
playlist or to one group's archives (its Pace) waits until INGEST_MIN_POLL_GAP_SEC have passed
since the last request to it ENDED (answered, failed or timed out), first tries, retries and the
resend after error 103 alike: the service counts the requests it receives, and a request arrives
somewhere between being sent and being answered, so only the answer is a time after which the
service is sure to have seen it. A retry waits max(backoff or Retry-After, gap left), and one
that would start after the retry budget is not sent. One request (with its retries) to a
selector is in flight at a time in this process; across processes and hosts, the caller's
`before_send` (ingest: renewing the playlist's claim in the database) runs before each attempt
and may refuse it by raising.

The secret, the password and the tokens never appear in logs or in error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import jwt
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential_jitter,
)

from workers.clients.http import StatusClass, retry_after_of, status_class
from workers.core.records import (
    JSON,
    BadValue,
    JSONObject,
    parse_json,
    show,
    whole_number,
    whole_number_or_none,
)
from workers.core.settings import BroadcastifySettings, Settings

log = logging.getLogger(__name__)

Clock = Callable[[], float]
BeforeSend = Callable[[], Awaitable[None]]

ERROR_BAD_TOKEN = 103  # bad signature or bad exp: make a new token once, then give up
ERROR_UNKNOWN_KEY = 108  # unknown key id: a configuration error
# After a configuration error, requests fail at once for this long instead of asking again:
# the settings are read once per process, so only a restart (or a fault of the service's) fixes
# it, and a failing key should not be sent every poll.
CONFIG_ERROR_HOLD_SEC = 300.0


class BroadcastifyError(Exception):
    """A request to the service failed."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TransientError(BroadcastifyError):
    """Worth another attempt: a timeout, a lost connection, 429 or 5xx."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ConfigurationError(BroadcastifyError):
    """The settings are wrong (unknown key id, missing credentials): retrying cannot help."""


class TokenRejected(BroadcastifyError):
    """Error 103 again with a freshly made token: the secret or the clock is wrong."""


@dataclass(frozen=True)
class Pace:
    """Requests to one selector, kept INGEST_MIN_POLL_GAP_SEC apart (the service's 5 s rule).

    `key` names the selector ("playlist_uuid=<uuid>", "group=<groupId>"); `before_send` runs
    just before each attempt is sent, after the wait, and raises to stop it being sent.
    """

    key: str
    before_send: BeforeSend | None = None


@dataclass(frozen=True)
class LivePage:
    """One answer of the live endpoint."""

    status: int
    server_time: int | None
    last_pos: int | None
    calls: list[JSON]


class BroadcastifyClient:
    """Talks to the service on a shared httpx.AsyncClient. One per process (Runtime.bcfy_api).

    `clock` (unix seconds) stamps and checks tokens and times the hold after error 108; tests
    replace it to expire tokens and to end the hold.
    """

    def __init__(
        self,
        bcfy: BroadcastifySettings,
        http: httpx.AsyncClient,
        *,
        total_timeout_sec: float,
        min_poll_gap_sec: float,
        retry_budget_sec: float,
        clock: Clock = time.time,
    ) -> None:
        self.bcfy = bcfy
        self.http = http
        self.clock = clock
        # From other stages' settings: HTTP_TOTAL_TIMEOUT_SEC per exchange, the 5 s rule
        # (INGEST_MIN_POLL_GAP_SEC), and retry_budget() below.
        self.total_timeout_sec = total_timeout_sec
        self.min_poll_gap_sec = min_poll_gap_sec
        self.retry_budget_sec = retry_budget_sec
        self.base = bcfy.api_base.rstrip("/")
        self.tokens_minted = 0
        self._token: str | None = None
        self._token_expires = 0.0
        self._user: tuple[int, str] | None = None  # (uid, utk) once logged in
        # Playlists are polled concurrently on this client: the first requests must share one
        # login, not each log in (and replace the others' user token).
        self._login_lock = asyncio.Lock()
        # Server time minus our clock, learned from live answers: back-fill decisions are made
        # on the service's clock.
        self.server_offset = 0.0
        self._config_error: tuple[float, str] | None = None  # (held since, by clock; message)
        # The 5 s rule, per Pace key: when the last request ended (time.monotonic()), and a
        # lock so that one request to a selector, with its retries, is in flight at a time.
        self._last_request_end: dict[str, float] = {}
        self._pace_locks: dict[str, asyncio.Lock] = {}
        self._backoff = wait_exponential_jitter(
            multiplier=bcfy.retry_backoff_sec,
            max=bcfy.retry_backoff_max_sec,
            jitter=bcfy.retry_backoff_sec,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, http: httpx.AsyncClient, *, clock: Clock = time.time
    ) -> BroadcastifyClient:
        return cls(
            settings.broadcastify,
            http,
            total_timeout_sec=settings.services.http_total_timeout_sec,
            min_poll_gap_sec=settings.ingest.min_poll_gap_sec,
            retry_budget_sec=retry_budget(settings),
            clock=clock,
        )

    # --- endpoints ---------------------------------------------------------------------------

    async def live_calls(
        self,
        playlist_uuid: str,
        *,
        pos: int | None = None,
        init: bool = False,
        before_send: BeforeSend | None = None,
    ) -> LivePage:
        """New calls of a playlist after `pos`, or the last 25 with init. Never neither: a poll
        without a cursor re-reads (and re-bills) five minutes of calls. Paced per playlist;
        `before_send` runs before each attempt (see Pace)."""
        if (pos is None) == (not init):
            raise ValueError("live_calls needs exactly one of pos or init")
        params: dict[str, str | int] = {"playlist_uuid": playlist_uuid}
        if pos is None:
            params["init"] = 1
        else:
            params["pos"] = pos
        pace = Pace(f"playlist_uuid={playlist_uuid}", before_send)
        status, body = await self.request("GET", "/calls/v1/live/", params=params, pace=pace)
        calls = body.get("calls")
        if calls is None:
            calls = []
        if not isinstance(calls, list):
            raise BroadcastifyError("live answer: 'calls' is not a list", status=status)
        server_time = self._learn_server_time(body, status)
        return LivePage(
            status=status,
            server_time=server_time,
            last_pos=_optional_int(body.get("lastPos"), "lastPos", status),
            calls=calls,
        )

    async def playlist_get(self, playlist_uuid: str) -> JSONObject:
        _, body = await self.request(
            "GET", "/calls/v1/playlist_get/", params={"uuid": playlist_uuid}
        )
        return body

    async def group_archives(self, group_id: str, start: int, end: int) -> tuple[int, list[JSON]]:
        """(HTTP status, calls) of one group between start and end (unix seconds, <= 8 h).
        Paced per group: a group is a selector of the service's too (`groups=`)."""
        status, body = await self.request(
            "GET",
            f"/calls/v1/group_archives/{_segment(group_id)}/{int(start)}/{int(end)}",
            pace=Pace(f"group={group_id}"),
        )
        calls = body.get("calls", [])
        if not isinstance(calls, list):
            raise BroadcastifyError("group_archives answer: 'calls' is not a list", status=status)
        self._learn_server_time(body, status)
        return status, calls

    async def countries(self) -> list[JSONObject]:
        return await self._list("/common/v1/countries", "countries")

    async def states(self, country_id: int) -> list[JSONObject]:
        return await self._list(f"/common/v1/states/{int(country_id)}", "states")

    async def counties(self, state_id: int) -> list[JSONObject]:
        return await self._list(f"/common/v1/counties/{int(state_id)}", "counties")

    def server_now(self) -> float:
        """The service's clock, as far as we know it (ours until an answer says otherwise)."""
        return self.clock() + self.server_offset

    def _learn_server_time(self, body: JSONObject, status: int) -> int | None:
        server_time = _optional_int(body.get("serverTime"), "serverTime", status)
        if server_time is not None:
            self.server_offset = server_time - self.clock()
        return server_time

    async def _list(self, path: str, key: str) -> list[JSONObject]:
        """A list answer; its wrapper key is not documented: `key` and `data` are both seen."""
        status, body = await self.request("GET", path)
        for name in (key, "data"):
            items = body.get(name)
            if isinstance(items, list):
                return [item for item in items if isinstance(item, dict)]
        raise BroadcastifyError(f"{path}: no {key!r} or 'data' list in the answer", status=status)

    # --- requests ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str | int] | None = None,
        data: dict[str, str] | None = None,
        as_user: bool = True,
        pace: Pace | None = None,
    ) -> tuple[int, JSONObject]:
        """(status, JSON object) of one request, with transient failures retried; with a
        `pace`, every attempt keeps the 5 s rule of its selector."""
        s = self.bcfy
        if self._config_error_held():
            # The service said the key is unknown: asking again soon would only repeat that.
            assert self._config_error is not None
            raise ConfigurationError(self._config_error[1])
        one_at_a_time: contextlib.AbstractAsyncContextManager[None] = (
            self._pace_locks.setdefault(pace.key, asyncio.Lock())
            if pace
            else contextlib.nullcontext()
        )
        async with one_at_a_time:
            # Made once the selector is ours, so the budget counts from our first attempt;
            # the wait is computed before the stop: a retry whose wait passes it is not sent.
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(TransientError),
                stop=stop_any(
                    stop_after_attempt(s.retry_attempts),
                    stop_before_delay(self.retry_budget_sec),
                ),
                wait=lambda state: self._wait(state, pace),
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(method, path, params, data, as_user, pace)
            except ConfigurationError as exc:
                self._config_error = (self.clock(), str(exc))
                raise
        raise AssertionError("unreachable")  # AsyncRetrying either returns or raises

    def _config_error_held(self) -> bool:
        """Within CONFIG_ERROR_HOLD_SEC of a configuration error (by `clock`; a clock stepped
        back before the error ends the hold rather than stretching it)."""
        if self._config_error is None:
            return False
        since = self.clock() - self._config_error[0]
        return 0 <= since < CONFIG_ERROR_HOLD_SEC

    def _wait(self, state: RetryCallState, pace: Pace | None = None) -> float:
        """Retry-After when the service gave one, else exponential backoff with jitter; never
        less than what is left of the selector's gap since its last request."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            wait = min(exc.retry_after, self.retry_budget_sec)
        else:
            wait = self._backoff(state)
        return max(wait, self._gap_left(pace))

    def _gap_left(self, pace: Pace | None) -> float:
        """Seconds until the selector may be asked again (0 without a pace or a last request)."""
        if pace is None or pace.key not in self._last_request_end:
            return 0.0
        due = self._last_request_end[pace.key] + self.min_poll_gap_sec
        return max(0.0, due - time.monotonic())

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning("bcfy api: %s; attempt %d, retrying in %.1fs", exc, state.attempt_number, wait)

    async def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, str | int] | None,
        data: dict[str, str] | None,
        as_user: bool,
        pace: Pace | None = None,
    ) -> tuple[int, JSONObject]:
        """One attempt, plus one more with a new token if the service says 103."""
        for fresh in (False, True):
            if fresh:
                log.warning("bcfy api: %s: token rejected (103); making a new one", path)
                self._forget_token()
            token = await self._valid_token(as_user)
            status, body = await self._paced_send(pace, method, path, params, data, token)
            errors = body.get("errors")
            if not errors:
                return status, body
            code, title = _first_error(errors)
            if code == ERROR_UNKNOWN_KEY:
                raise ConfigurationError(
                    f"the service does not know BCFY_API_KEY_ID ({title}, error 108): check "
                    "BCFY_API_KEY_ID, BCFY_API_KEY and BCFY_APP_ID",
                    status=status,
                    code=code,
                )
            if code != ERROR_BAD_TOKEN:
                raise BroadcastifyError(f"{path}: error {code}: {title}", status=status, code=code)
        raise TokenRejected(
            f"{path}: token rejected twice (error 103: {title}): check BCFY_API_KEY and the "
            "system clock",
            status=status,
            code=ERROR_BAD_TOKEN,
        )

    async def _paced_send(
        self,
        pace: Pace | None,
        method: str,
        path: str,
        params: dict[str, str | int] | None,
        data: dict[str, str] | None,
        token: str,
    ) -> tuple[int, JSONObject]:
        """_send, once the selector's gap has passed and `before_send` agreed; the end of the
        exchange, whatever its outcome, starts the next gap."""
        if pace is None:
            return await self._send(method, path, params, data, token)
        # A retry has waited already (in _wait); a first try or a resend after 103 waits here.
        await asyncio.sleep(self._gap_left(pace))
        if pace.before_send is not None:
            await pace.before_send()
        try:
            return await self._send(method, path, params, data, token)
        finally:
            self._last_request_end[pace.key] = time.monotonic()

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str | int] | None,
        data: dict[str, str] | None,
        token: str,
    ) -> tuple[int, JSONObject]:
        """One HTTP exchange under the total timeout; classify the answer."""
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with asyncio.timeout(self.total_timeout_sec):
                async with self.http.stream(
                    method, self.base + path, params=params, data=data, headers=headers
                ) as response:
                    status = response.status_code
                    kind = status_class(status)
                    # A transient answer is retried on its status alone: its body is not read.
                    content = (
                        b""
                        if kind is StatusClass.TRANSIENT
                        else await self._read_body(response, path)
                    )
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise TransientError(f"{path}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{path}: {type(exc).__name__}: {exc}") from None
        log.debug("bcfy api: %s %s -> %d", method, path, status)
        if kind is StatusClass.TRANSIENT:
            raise TransientError(
                f"{path}: 429 too many requests" if status == 429 else f"{path}: HTTP {status}",
                status=status,
                retry_after=retry_after_of(response, self.clock),
            )
        if kind is StatusClass.PERMANENT:
            raise BroadcastifyError(f"{path}: HTTP {status}: {_snippet(content)}", status=status)
        try:
            body = parse_json(content)
        except BadValue as exc:
            problem = "malformed JSON" if str(exc).startswith("malformed") else str(exc)
            raise BroadcastifyError(
                f"{path}: {problem} in a {status} answer: {_snippet(content)}", status=status
            ) from None
        if not isinstance(body, dict):
            raise BroadcastifyError(f"{path}: answer is not a JSON object", status=status)
        return status, body

    async def _read_body(self, response: httpx.Response, path: str) -> bytes:
        """The answer's body, read in chunks up to BCFY_MAX_RESPONSE_BYTES (decoded): a larger
        one is refused as soon as it says so (Content-Length) or grows past the cap."""
        cap = self.bcfy.max_response_bytes
        # None when absent or unreadable: the count below still holds.
        declared = whole_number_or_none(response.headers.get("Content-Length"), "Content-Length", 0)
        if declared is not None and declared > cap:
            raise _oversize(path, response.status_code, cap, f"{declared} bytes declared")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise _oversize(path, response.status_code, cap, f"over {cap} bytes read")
            chunks.append(chunk)
        return b"".join(chunks)

    # --- tokens ------------------------------------------------------------------------------

    async def _valid_token(self, as_user: bool) -> str:
        """The cached token, or a new one when it is missing or within the margin of expiry."""
        if as_user and self._user is None and self.bcfy.username:
            async with self._login_lock:
                if self._user is None:
                    await self._log_in()
        if not as_user:
            return self._mint(user=None)
        now = self.clock()
        if self._token is None or now >= self._token_expires - self.bcfy.jwt_renew_margin_sec:
            self._token = self._mint(user=self._user)
            self._token_expires = now + self.bcfy.jwt_lifetime_sec
        return self._token

    def _forget_token(self) -> None:
        self._token = None

    def _mint(self, user: tuple[int, str] | None) -> str:
        s = self.bcfy
        missing = [
            name
            for name, value in (
                ("BCFY_API_KEY_ID", s.api_key_id),
                ("BCFY_API_KEY", s.api_key),
                ("BCFY_APP_ID", s.app_id),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(f"the Broadcastify API needs {', '.join(missing)}: not set")
        now = int(self.clock())
        claims: dict[str, str | int] = {
            "iss": s.app_id,
            "iat": now,
            "exp": now + int(s.jwt_lifetime_sec),
        }
        if user is not None:
            claims["sub"], claims["utk"] = user
        self.tokens_minted += 1
        return jwt.encode(
            claims,
            s.api_key.reveal(),
            algorithm="HS256",
            headers={"kid": s.api_key_id},
        )

    async def _log_in(self) -> None:
        """User auth for non-public playlists: uid and token, sent with an app-only JWT."""
        s = self.bcfy
        if not s.password:
            raise ConfigurationError("BCFY_USERNAME is set but BCFY_PASSWORD is not")
        try:
            _, body = await self._attempt(
                "POST",
                "/common/v1/auth",
                None,
                {"username": s.username, "password": s.password.reveal()},
                as_user=False,
            )
        except (ConfigurationError, TransientError):
            raise
        except BroadcastifyError as exc:
            raise ConfigurationError(
                f"login as BCFY_USERNAME failed: {exc}", status=exc.status, code=exc.code
            ) from None
        data = body.get("data")
        found = data if isinstance(data, dict) else body
        utk = found.get("token")
        uid = whole_number_or_none(found.get("uid"), "uid", 0, 2**63 - 1)
        if not isinstance(utk, str) or not utk or uid is None:
            raise ConfigurationError("login as BCFY_USERNAME: no uid and token in the answer")
        self._user = (uid, utk)
        self._forget_token()
        log.info("bcfy api: logged in as %s (uid %s)", s.username, uid)


def retry_budget(settings: Settings) -> float:
    """Seconds within which retries may start: BCFY_RETRY_BUDGET_SEC, cut down so that the
    last attempt (up to HTTP_TOTAL_TIMEOUT_SEC) still ends inside a job's soft time limit."""
    room = settings.jobs.soft_time_limit_sec - settings.services.http_total_timeout_sec
    return max(0.0, min(settings.broadcastify.retry_budget_sec, room))


# --- helpers ---------------------------------------------------------------------------------


def _first_error(errors: JSON) -> tuple[int | None, str]:
    first = errors[0] if isinstance(errors, list) and errors else errors
    if isinstance(first, dict):
        return whole_number_or_none(first.get("code"), "code"), _text(
            first.get("title") or first.get("message") or ""
        )
    return None, _text(first)


def _text(value: JSON) -> str:
    """An error title from the answer, short (never raises, whatever its type)."""
    return value[:200] if isinstance(value, str) else show(value)


def _optional_int(value: JSON, name: str, status: int) -> int | None:
    """An envelope number (lastPos, serverTime): a whole number that fits the database's
    bigint, or a BroadcastifyError saying which field and why (the poll fails, its cursor
    stays)."""
    if value is None:
        return None
    try:
        return whole_number(value, name, -(2**63 - 1), 2**63 - 1)
    except BadValue as exc:
        raise BroadcastifyError(f"live answer: {exc}", status=status) from None


def _oversize(path: str, status: int, cap: int, seen: str) -> BroadcastifyError:
    return BroadcastifyError(
        f"{path}: the answer is larger than BCFY_MAX_RESPONSE_BYTES ({cap}; {seen}): not read",
        status=status,
    )


def _segment(value: str) -> str:
    """A path segment, with anything that could change the path escaped."""
    return urllib.parse.quote(str(value), safe="-_.~")


def _snippet(content: bytes) -> str:
    text = content[:200].decode("utf-8", "replace").replace("\n", " ")
    return text or "(empty body)"
