"""Where alerts go, and one send to one target.

Two kinds of target URL:
  * `http://` or `https://`: a plain JSON webhook, POSTed by the process's httpx client. Its
    answer is classified as every HTTP answer here is (workers.clients.http): 2xx sent; 429,
    5xx (and 408, 409, 425) or a timeout: try again later, at least its Retry-After; any other
    status: refused for good.
  * anything else: an Apprise URL (discord://, tgram://, slack://, mailto://, ntfy://,
    pover://, matrix://, json://, ...), sent by Apprise. Apprise says only whether a send
    worked; when its log names an HTTP status (its JSON, form and XML targets do), the status
    is classified the same way; otherwise a failure is tried again. Apprise does not pass
    Retry-After on, so its targets back off on our schedule alone.

A URL carries tokens: it is a secret. `shown_target` is what logs, errors and commands show:
the scheme, and the host for the web-hook kinds (whose host is a server's name, not a token)
unless the URL has user information.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from workers.clients.http import StatusClass, retry_after_of, status_class

log = logging.getLogger(__name__)

# Apprise's JSON, form and XML targets: the idempotency key goes along as a header, and their
# host is shown (it names a server; the path and query may carry tokens).
HEADER_SCHEMES = frozenset({"json", "jsons", "form", "forms", "xml", "xmls"})
WEBHOOK_SCHEMES = frozenset({"http", "https"})
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Apprise's failure lines name the status like "..., error=429."
_APPRISE_STATUS = re.compile(r"error=(\d{3})\b")


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def shown_target(url: str) -> str:
    """The target as people may see it: `json://host:port/…`, `https://host/…`, `discord://…`.
    Never the user information, path or query (tokens live there)."""
    scheme = _scheme(url)
    if not scheme:
        return "(not a URL)"
    # With user information ("@" anywhere: a password may hold "/" or "?" unencoded, and then
    # a parser takes part of it for the host), the host is not shown either.
    if scheme in WEBHOOK_SCHEMES | HEADER_SCHEMES and "@" not in url:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            host, port = "", ""
        if host:
            return f"{scheme}://{host}{port}/…"
    return f"{scheme}://…"


def target_problem(url: str) -> str | None:
    """Why `url` cannot be a target (None: it can). The message shows only `shown_target`."""
    scheme = _scheme(url)
    shown = shown_target(url)
    if not scheme:
        return "a target must be a URL (scheme://...), an Apprise URL or an http(s) webhook"
    if scheme in WEBHOOK_SCHEMES:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        return None if host else f"{shown}: an http(s) webhook needs a host"
    import apprise

    if not apprise.Apprise(asset=_asset()).add(url):
        return f"{shown}: not a URL Apprise can send to (unknown scheme, or a malformed URL)"
    return None


@dataclass(frozen=True)
class SendResult:
    ok: bool
    transient: bool = False  # worth trying again later
    retry_after: float | None = None  # what the target asked for, seconds
    error: str = ""  # what went wrong; never the URL


async def send(
    http: httpx.AsyncClient,
    url: str,
    *,
    title: str,
    body: str,
    payload: dict[str, Any],
    idempotency_key: str,
    limit_sec: float,
) -> SendResult:
    """One try of one delivery. Never raises for a failed send; never puts the URL in an error."""
    quiet_target_logs()
    try:
        if _scheme(url) in WEBHOOK_SCHEMES:
            return await _send_webhook(http, url, payload, idempotency_key, limit_sec)
        return await _send_apprise(url, title, body, idempotency_key, limit_sec)
    except Exception as exc:  # a fault in a library: tried again, never the URL in the text
        return SendResult(False, transient=True, error=f"{type(exc).__name__} while sending")


async def _send_webhook(
    http: httpx.AsyncClient, url: str, payload: dict[str, Any], key: str, limit_sec: float
) -> SendResult:
    try:
        response = await http.post(
            url,
            json=payload,
            headers={IDEMPOTENCY_HEADER: key},
            timeout=httpx.Timeout(limit_sec),
        )
    except httpx.TimeoutException:
        return SendResult(False, transient=True, error=f"no answer within {limit_sec:g}s")
    except httpx.HTTPError as exc:
        return SendResult(False, transient=True, error=f"{type(exc).__name__}: cannot connect")
    kind = status_class(response.status_code)
    if kind is StatusClass.SUCCESS:
        return SendResult(True)
    return SendResult(
        False,
        transient=kind is StatusClass.TRANSIENT,
        retry_after=retry_after_of(response),
        error=f"HTTP {response.status_code}",
    )


def _asset() -> Any:
    import apprise
    from apprise.common import PersistentStoreMode

    # No files of Apprise's own: nothing written under the user's home by a worker.
    return apprise.AppriseAsset(storage_mode=PersistentStoreMode.MEMORY)


def _with_header(url: str, key: str) -> str:
    """An Apprise JSON/form/XML URL that also sends the idempotency key as a header."""
    if _scheme(url) not in HEADER_SCHEMES:
        return url
    joiner = "&" if "?" in url.split("#", 1)[0] else "?"
    return f"{url}{joiner}+{IDEMPOTENCY_HEADER}={key}"


async def _send_apprise(url: str, title: str, body: str, key: str, limit_sec: float) -> SendResult:
    import apprise
    from apprise.common import NotifyFormat

    notifier = apprise.Apprise(asset=_asset())
    if not notifier.add(_with_header(url, key)):
        return SendResult(False, error="not a URL Apprise can send to")
    try:
        result = await asyncio.wait_for(
            notifier.async_notify(body=body, title=title, body_format=NotifyFormat.MARKDOWN),
            limit_sec + 1,
        )
    except TimeoutError:
        return SendResult(False, transient=True, error=f"no answer within {limit_sec:g}s")
    if result:
        return SendResult(True)
    status = _apprise_status(result)
    if status is None:
        return SendResult(False, transient=True, error="not accepted (Apprise gave no status)")
    return SendResult(
        False,
        transient=status_class(status) is not StatusClass.PERMANENT,
        error=f"HTTP {status}",
    )


def _apprise_status(result: Any) -> int | None:
    """The HTTP status an Apprise failure logged, if any (its log lines are not stored: they
    may quote parts of the URL)."""
    for service in result:
        for attempt in service:
            for entry in attempt:
                match = _APPRISE_STATUS.search(entry.message)
                if match:
                    return int(match.group(1))
    return None


def quiet_target_logs() -> None:
    """Apprise logs its own lines, some naming a target's parts, and httpx logs each request's
    whole URL at INFO: a webhook's token. The process records outcomes itself (with
    shown_target), so Apprise's lines stay in its results and httpx's requests go unlogged."""
    logging.getLogger("apprise").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
