"""Downloading a call's audio from a URL that came from outside, safely.

The URL is the service's `url` field: data, not configuration. Before every request, the first
and each redirect alike:
  * only http and https, no user:password@ in the URL;
  * the host (and port) must be in AUDIO_ALLOWED_HOSTS;
  * the host is resolved without blocking the event loop (`loop.getaddrinfo`, which runs in
    the default executor), and *every* address it resolves to must be public: loopback,
    private, link-local, multicast, reserved and unspecified addresses are refused unless they
    lie in AUDIO_ALLOWED_INTERNAL_NETWORKS, and so is an IPv6 address carrying such an IPv4
    address (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo client or server);
  * the request then goes to the address that was checked, not to the name: the URL carries
    the IP, the Host header carries the name, and for https the TLS server name (SNI, and so
    the certificate check) is the name (httpcore's `sni_hostname`). A second DNS answer,
    different from the one checked (DNS rebinding), is never asked for.
Redirects are followed here, one hop at a time, never by httpx (the shared client has
follow_redirects=False). The body is streamed to a file, counted against AUDIO_MAX_BYTES whether
or not a Content-Length was sent, hashed as it arrives, and the whole download has a deadline.

Known limits: a proxy configured through the environment (HTTP_PROXY) would receive the IP URL;
the pipeline sets none. Keep-alive connections are pooled by IP, so two allowed names on one
IP may share a TLS connection made for the first name (the certificate covered that name).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from workers.clients.http import retry_after_of
from workers.core.records import whole_number_or_none
from workers.core.settings import split_host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECTS = {301, 302, 303, 307, 308}
# Bodies that are certainly not audio: an error page, a JSON error, a login form.
NOT_AUDIO_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")
CHUNK = 64 * 1024
FLUSH_AT = 1024 * 1024


class AudioFailure(Exception):
    """Why a call's audio could not be prepared: a short code, a precise text, and whether
    another attempt may succeed (policy refusals never will)."""

    def __init__(
        self, code: str, detail: str, *, retry: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retry = retry
        self.retry_after = retry_after


def refused(code: str, detail: str) -> AudioFailure:
    """A policy refusal: trying again cannot help, so the call fails at once."""
    return AudioFailure(code, detail, retry=False)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    content_type: str
    url: str  # the URL the body came from, after redirects
    redirects: int
    elapsed_sec: float


@dataclass(frozen=True)
class Target:
    """One checked hop: where the URL points, and the address we will connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host, without blocking the loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215; refused by its own flags
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (RFC 4291)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with the name of the form: packets to
    it may end up at that IPv4 address (a relay, a NAT64 gateway, a dual-stack socket)."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48
        found.append(("a 6to4", ip.sixtofour))
    if ip.teredo is not None:  # 2001::/32: the server, and the client stored inverted
        server, client = ip.teredo
        found += [("a Teredo", client), ("a Teredo", server)]
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in NAT64_WELL_KNOWN or ip in NAT64_LOCAL_USE:
        found.append(("a NAT64", low32))  # RFC 6052 /96 placement
    # ::/104 (:: and ::1 among them) is left to the address's own flags.
    if ip in IPV4_COMPATIBLE and int(ip) >> 24:
        found.append(("an IPv4-compatible", low32))
    return found


def _internal_kind(ip: IPAddress) -> str | None:
    """What makes an address internal ("a loopback address", "a 6to4 address carrying
    127.0.0.1, a loopback address"), or None for a public one. An IPv6 address is refused when
    any IPv4 address it carries would be; an IPv4-mapped one is judged as its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = _internal_kind(ip.ipv4_mapped)
            return f"an IPv4-mapped address carrying {ip.ipv4_mapped}, {inner}" if inner else None
        for form, v4 in _embedded_ipv4(ip):
            inner = _internal_kind(v4)
            if inner is not None:
                return f"{form} address carrying {v4}, {inner}"
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("not globally reachable", not ip.is_global),
    ):
        if flag:
            return f"a {kind} address"
    return None


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs audio may be fetched from (see the module's docstring)."""

    allowed_hosts: tuple[str, ...]
    allowed_internal_networks: tuple[str, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    def _host_allowed(self, scheme: str, host: str, port: int) -> bool:
        for entry in self.allowed_hosts:
            name, entry_port = split_host_port(entry)
            if entry_port:
                if int(entry_port) != port:
                    continue
            elif port != DEFAULT_PORTS[scheme]:
                continue
            if name.startswith("*."):
                if host.endswith(name[1:]) and host != name[2:]:
                    return True
            elif host == name:
                return True
        return False

    def _address_allowed(self, ip: IPAddress) -> bool:
        # (an address is never `in` a network of the other IP version)
        return any(ip in ipaddress.ip_network(net) for net in self.allowed_internal_networks)

    def _check_addresses(self, host: str, addresses: list[str], literal: bool) -> None:
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            kind = _internal_kind(ip)
            if kind is not None and not self._address_allowed(ip):
                via = "" if literal else f" ({host} resolves to it)"
                raise refused(
                    "internal_address",
                    f"{ip} is {kind}{via}; not in AUDIO_ALLOWED_INTERNAL_NETWORKS",
                )

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an acceptable URL; raises AudioFailure otherwise. An IP
        address in the URL is judged as an address first (the more telling reason); a name
        not in the allowlist is refused before it is ever resolved."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise refused("bad_url", f"{url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise refused("disallowed_scheme", f"{scheme or 'no'} scheme in {url!r}")
        if parts.username is not None or parts.password is not None:
            raise refused("bad_url", "credentials in the URL")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise refused("bad_url", f"no host in {url!r}")
        port = port or DEFAULT_PORTS[scheme]
        if _ip_literal(host) is not None:
            self._check_addresses(host, [host], literal=True)
        if not self._host_allowed(scheme, host, port):
            shown = host if port == DEFAULT_PORTS[scheme] else f"{_bracketed(host)}:{port}"
            raise refused("disallowed_host", f"{shown} is not in AUDIO_ALLOWED_HOSTS")
        return scheme, host, port

    async def check(self, url: str) -> Target:
        """Check the URL, resolve its host and check every address; the address to use."""
        scheme, host, port = self.check_url(url)
        if _ip_literal(host) is not None:
            return Target(url, scheme, host, port, host)
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise AudioFailure("dns_error", f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise AudioFailure("dns_error", f"{host} resolves to no address")
        self._check_addresses(host, addresses, literal=False)
        return Target(url, scheme, host, port, addresses[0])


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _request_for(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL (to the checked IP), headers and extensions for one request to `target`."""
    parts = urlsplit(target.url)
    ip_host = _bracketed(str(ipaddress.ip_address(target.address.split("%", 1)[0])))
    default = target.port == DEFAULT_PORTS[target.scheme]
    netloc = ip_host if default else f"{ip_host}:{target.port}"
    host = _bracketed(target.host)
    host_header = host if default else f"{host}:{target.port}"
    url = urlunsplit((target.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {"Host": host_header, "Accept-Encoding": "identity", "Accept": "audio/*, */*;q=0.5"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return url, headers, extensions


def _check_response(response: httpx.Response, url: str, max_bytes: int) -> None:
    status = response.status_code
    if status != 200:
        # Tried again up to AUDIO_MAX_ATTEMPTS whatever the status (workers.clients.http says
        # which are transient, and so whose Retry-After counts).
        reason = response.reason_phrase or ""
        raise AudioFailure(
            f"http_{status}",
            f"GET {url} answered {status} {reason}".rstrip(),
            retry_after=retry_after_of(response),
        )
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(NOT_AUDIO_TYPES):
        raise AudioFailure("not_audio", f"GET {url} answered Content-Type {content_type}")
    length = whole_number_or_none(response.headers.get("content-length"), "Content-Length", 0)
    if length is not None and length > max_bytes:
        raise refused("too_large", f"Content-Length {length} exceeds {max_bytes} bytes")


async def download(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    policy: UrlPolicy,
    *,
    max_bytes: int,
    max_redirects: int,
    timeout_sec: float,
) -> Downloaded:
    """Fetch `url` into `dest` (created or truncated), under the policy. Raises AudioFailure.

    On failure `dest` may hold a partial body: the caller owns the file and removes it.
    """
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_sec):
            return await _download(client, url, dest, policy, max_bytes, max_redirects, started)
    except TimeoutError:
        raise AudioFailure(
            "timeout", f"download of {url} took longer than {timeout_sec:g}s"
        ) from None


async def _download(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    policy: UrlPolicy,
    max_bytes: int,
    max_redirects: int,
    started: float,
) -> Downloaded:
    current = url
    for hop in range(max_redirects + 1):
        try:
            target = await policy.check(current)
        except AudioFailure as exc:
            if not hop:
                raise
            raise AudioFailure(
                exc.code, f"redirect {hop} to {current}: {exc.detail}", retry=exc.retry
            ) from None
        request_url, headers, extensions = _request_for(target)
        try:
            async with client.stream(
                "GET", request_url, headers=headers, extensions=extensions
            ) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                _check_response(response, current, max_bytes)
                size, digest = await _stream_to_file(response, dest, max_bytes)
                return Downloaded(
                    path=dest,
                    size=size,
                    sha256=digest,
                    content_type=response.headers.get("content-type", ""),
                    url=current,
                    redirects=hop,
                    elapsed_sec=time.monotonic() - started,
                )
        except httpx.RemoteProtocolError as exc:
            raise AudioFailure("truncated", f"GET {current}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise AudioFailure(
                "timeout", f"GET {current}: {type(exc).__name__} {exc}".rstrip()
            ) from None
        except httpx.HTTPError as exc:
            raise AudioFailure(
                "network", f"GET {current}: {type(exc).__name__} {exc}".rstrip()
            ) from None
    raise AudioFailure("too_many_redirects", f"more than {max_redirects} redirects from {url}")


async def _stream_to_file(response: httpx.Response, dest: Path, max_bytes: int) -> tuple[int, str]:
    """Write the body to dest, counting and hashing it; stop past max_bytes. Writes go through
    the executor in blocks of FLUSH_AT (a typical call is one block), never on the loop."""
    expected = whole_number_or_none(response.headers.get("content-length"), "Content-Length", 0)
    digest = hashlib.sha256()
    size = 0
    pending = bytearray()
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, _open_for_writing, dest)
    try:
        async for chunk in response.aiter_raw(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise refused("too_large", f"body exceeds {max_bytes} bytes (no Content-Length)")
            digest.update(chunk)
            pending += chunk
            if len(pending) >= FLUSH_AT:
                block, pending = bytes(pending), bytearray()
                await loop.run_in_executor(None, _write_all, fd, block)
    finally:
        await loop.run_in_executor(None, _write_and_close, fd, bytes(pending))
    if expected is not None and size != expected:
        raise AudioFailure("truncated", f"received {size} of {expected} bytes")
    if size == 0:
        raise AudioFailure("not_audio", "empty body")
    return size, digest.hexdigest()


def _open_for_writing(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def _write_and_close(fd: int, data: bytes) -> None:
    """The last block, then the data to disk (the file is renamed into place later)."""
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
