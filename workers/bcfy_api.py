"""The one Broadcastify API client: tokens, timeouts, retries and error handling for every job.

    api = Runtime.current().bcfy_api          # one per process, on the process's httpx client
    page = await api.live_calls(uuid, pos=cursor)

Tokens: an HS256 JWT signed with the API key secret (header `kid` = key id, claim `iss` = app
id), made with PyJWT, cached and checked before every request: a token within
BCFY_JWT_RENEW_MARGIN_SEC of its expiry is replaced first. With BCFY_USERNAME/BCFY_PASSWORD set,
the client logs in once (`/common/v1/auth`, app-only token) and adds `sub`/`utk` to its tokens.

Errors (all subclasses of BroadcastifyError; `status` is the HTTP status when one came back):
  * TransientError - timeouts, connection errors, 429 (honouring Retry-After), 5xx. Retried with
    tenacity: exponential backoff with jitter, at most BCFY_RETRY_ATTEMPTS attempts, none
    started after BCFY_RETRY_BUDGET_SEC, so a request with its retries fits inside one run.
  * ConfigurationError - error 108 (unknown key id), missing credentials, a rejected login.
    Never retried: only the operator can fix it.
  * TokenRejected - error 103 (bad signature or exp) again after one fresh token.
  * BroadcastifyError - any other non-2xx, a body that is not JSON, an error in a 200 answer.

The secret, the password and the tokens never appear in logs or in error messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

from workers.retry_after import retry_after_sec
from workers.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], float]

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
class LivePage:
    """One answer of the live endpoint."""

    status: int
    server_time: int | None
    last_pos: int | None
    calls: list[Any]


class BroadcastifyClient:
    """Talks to the service on a shared httpx.AsyncClient. One per process (Runtime.bcfy_api).

    `clock` (unix seconds) stamps and checks tokens and times the hold after error 108; tests
    replace it to expire tokens and to end the hold.
    """

    def __init__(
        self, settings: Settings, http: httpx.AsyncClient, *, clock: Clock = time.time
    ) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.base = settings.bcfy_api_base.rstrip("/")
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
        self._config_error: tuple[float, str] | None = None  # (held since, message)
        self._backoff = wait_exponential_jitter(
            multiplier=settings.bcfy_retry_backoff_sec,
            max=settings.bcfy_retry_backoff_max_sec,
            jitter=settings.bcfy_retry_backoff_sec,
        )

    # --- endpoints ---------------------------------------------------------------------------

    async def live_calls(
        self, playlist_uuid: str, *, pos: int | None = None, init: bool = False
    ) -> LivePage:
        """New calls of a playlist after `pos`, or the last 25 with init. Never neither: a poll
        without a cursor re-reads (and re-bills) five minutes of calls."""
        if (pos is None) == (not init):
            raise ValueError("live_calls needs exactly one of pos or init")
        params: dict[str, Any] = {"playlist_uuid": playlist_uuid}
        if init:
            params["init"] = 1
        else:
            params["pos"] = pos
        status, body = await self.request("GET", "/calls/v1/live/", params=params)
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

    async def playlist_get(self, playlist_uuid: str) -> dict[str, Any]:
        _, body = await self.request(
            "GET", "/calls/v1/playlist_get/", params={"uuid": playlist_uuid}
        )
        return body

    async def group_archives(self, group_id: str, start: int, end: int) -> tuple[int, list[Any]]:
        """(HTTP status, calls) of one group between start and end (unix seconds, <= 8 h)."""
        status, body = await self.request(
            "GET", f"/calls/v1/group_archives/{_segment(group_id)}/{int(start)}/{int(end)}"
        )
        calls = body.get("calls", [])
        if not isinstance(calls, list):
            raise BroadcastifyError("group_archives answer: 'calls' is not a list", status=status)
        self._learn_server_time(body, status)
        return status, calls

    async def countries(self) -> list[dict[str, Any]]:
        return await self._list("/common/v1/countries", "countries")

    async def states(self, country_id: int) -> list[dict[str, Any]]:
        return await self._list(f"/common/v1/states/{int(country_id)}", "states")

    async def counties(self, state_id: int) -> list[dict[str, Any]]:
        return await self._list(f"/common/v1/counties/{int(state_id)}", "counties")

    def server_now(self) -> float:
        """The service's clock, as far as we know it (ours until an answer says otherwise)."""
        return self.clock() + self.server_offset

    def _learn_server_time(self, body: dict[str, Any], status: int) -> int | None:
        server_time = _optional_int(body.get("serverTime"), "serverTime", status)
        if server_time is not None:
            self.server_offset = server_time - self.clock()
        return server_time

    async def _list(self, path: str, key: str) -> list[dict[str, Any]]:
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
        params: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        as_user: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON object) of one request, with transient failures retried."""
        s = self.settings
        if self._config_error_held():
            # The service said the key is unknown: asking again soon would only repeat that.
            assert self._config_error is not None
            raise ConfigurationError(self._config_error[1])
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_any(
                stop_after_attempt(s.bcfy_retry_attempts),
                stop_before_delay(retry_budget(s)),
            ),
            wait=self._wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(method, path, params, data, as_user)
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

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the service gave one, else exponential backoff with jitter."""
        s = self.settings
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return min(exc.retry_after, retry_budget(s))
        return self._backoff(state)

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning("bcfy api: %s; attempt %d, retrying in %.1fs", exc, state.attempt_number, wait)

    async def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        data: dict[str, Any] | None,
        as_user: bool,
    ) -> tuple[int, dict[str, Any]]:
        """One attempt, plus one more with a new token if the service says 103."""
        for fresh in (False, True):
            if fresh:
                log.warning("bcfy api: %s: token rejected (103); making a new one", path)
                self._forget_token()
            token = await self._valid_token(as_user)
            status, body = await self._send(method, path, params, data, token)
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

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        data: dict[str, Any] | None,
        token: str,
    ) -> tuple[int, dict[str, Any]]:
        """One HTTP exchange under the total timeout; classify the answer."""
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with asyncio.timeout(self.settings.http_total_timeout_sec):
                response = await self.http.request(
                    method, self.base + path, params=params, data=data, headers=headers
                )
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise TransientError(f"{path}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{path}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        log.debug("bcfy api: %s %s -> %d", method, path, status)
        if status == 429:
            raise TransientError(
                f"{path}: 429 too many requests",
                status=status,
                retry_after=retry_after_sec(response.headers.get("Retry-After"), self.clock),
            )
        if status >= 500:
            raise TransientError(f"{path}: HTTP {status}", status=status)
        if not 200 <= status < 300:
            raise BroadcastifyError(f"{path}: HTTP {status}: {_snippet(response)}", status=status)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BroadcastifyError(
                f"{path}: malformed JSON in a {status} answer: {_snippet(response)}", status=status
            ) from None
        if not isinstance(body, dict):
            raise BroadcastifyError(f"{path}: answer is not a JSON object", status=status)
        return status, body

    # --- tokens ------------------------------------------------------------------------------

    async def _valid_token(self, as_user: bool) -> str:
        """The cached token, or a new one when it is missing or within the margin of expiry."""
        if as_user and self._user is None and self.settings.bcfy_username:
            async with self._login_lock:
                if self._user is None:
                    await self._log_in()
        if not as_user:
            return self._mint(user=None)
        now = self.clock()
        if (
            self._token is None
            or now >= self._token_expires - self.settings.bcfy_jwt_renew_margin_sec
        ):
            self._token = self._mint(user=self._user)
            self._token_expires = now + self.settings.bcfy_jwt_lifetime_sec
        return self._token

    def _forget_token(self) -> None:
        self._token = None

    def _mint(self, user: tuple[int, str] | None) -> str:
        s = self.settings
        missing = [
            name
            for name, value in (
                ("BCFY_API_KEY_ID", s.bcfy_api_key_id),
                ("BCFY_API_KEY", s.bcfy_api_key),
                ("BCFY_APP_ID", s.bcfy_app_id),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(f"the Broadcastify API needs {', '.join(missing)}: not set")
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": s.bcfy_app_id,
            "iat": now,
            "exp": now + int(s.bcfy_jwt_lifetime_sec),
        }
        if user is not None:
            claims["sub"], claims["utk"] = user
        self.tokens_minted += 1
        return jwt.encode(
            claims, s.bcfy_api_key.reveal(), algorithm="HS256", headers={"kid": s.bcfy_api_key_id}
        )

    async def _log_in(self) -> None:
        """User auth for non-public playlists: uid and token, sent with an app-only JWT."""
        s = self.settings
        if not s.bcfy_password:
            raise ConfigurationError("BCFY_USERNAME is set but BCFY_PASSWORD is not")
        try:
            _, body = await self._attempt(
                "POST",
                "/common/v1/auth",
                None,
                {"username": s.bcfy_username, "password": s.bcfy_password.reveal()},
                as_user=False,
            )
        except (ConfigurationError, TransientError):
            raise
        except BroadcastifyError as exc:
            raise ConfigurationError(
                f"login as BCFY_USERNAME failed: {exc}", status=exc.status, code=exc.code
            ) from None
        found = body.get("data") if isinstance(body.get("data"), dict) else body
        uid, utk = found.get("uid"), found.get("token")
        if not isinstance(utk, str) or not utk or not _is_int(uid):
            raise ConfigurationError("login as BCFY_USERNAME: no uid and token in the answer")
        self._user = (int(uid), utk)
        self._forget_token()
        log.info("bcfy api: logged in as %s (uid %s)", s.bcfy_username, uid)


def retry_budget(settings: Settings) -> float:
    """Seconds within which retries may start: BCFY_RETRY_BUDGET_SEC, cut down so that the
    last attempt (up to HTTP_TOTAL_TIMEOUT_SEC) still ends inside a job's soft time limit."""
    room = settings.job_soft_time_limit_sec - settings.http_total_timeout_sec
    return max(0.0, min(settings.bcfy_retry_budget_sec, room))


# --- helpers ---------------------------------------------------------------------------------


def _first_error(errors: Any) -> tuple[int | None, str]:
    first = errors[0] if isinstance(errors, list) and errors else errors
    if isinstance(first, dict):
        code = first.get("code")
        try:
            code = int(code)
        except (TypeError, ValueError):
            code = None
        return code, str(first.get("title") or first.get("message") or "")[:200]
    return None, str(first)[:200]


def _optional_int(value: Any, name: str, status: int) -> int | None:
    if value is None:
        return None
    if _is_int(value):
        return int(value)
    raise BroadcastifyError(f"live answer: {name} is not a whole number: {value!r}", status=status)


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float) and value.is_integer():
        return True
    return isinstance(value, str) and value.strip().isdigit()


def _segment(value: str) -> str:
    """A path segment, with anything that could change the path escaped."""
    return urllib.parse.quote(str(value), safe="-_.~")


def _snippet(response: httpx.Response) -> str:
    text = response.text[:200].replace("\n", " ")
    return text or "(empty body)"
