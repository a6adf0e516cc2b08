"""The safe downloader against a real local HTTP server: only allowed hosts and public
addresses (loopback only by explicit opt-in), every redirect re-checked, the checked address is
the one connected to, size cap with and without Content-Length, precise reasons."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import httpx
import pytest

from tests.audio_helpers import CLIPS_DIR, ClipServer, clip_server
from workers.audio_download import AudioFailure, UrlPolicy, download

CAP = 1_000_000


@pytest.fixture
def server() -> Iterator[ClipServer]:
    yield from clip_server()


def fetch(url: str, policy: UrlPolicy, dest, *, max_redirects: int = 3, cap: int = CAP):
    async def go():
        async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
            return await download(
                client,
                url,
                dest,
                policy,
                max_bytes=cap,
                max_redirects=max_redirects,
                timeout_sec=20,
            )

    return asyncio.run(go())


def failure(url: str, policy: UrlPolicy, dest, **kw) -> AudioFailure:
    with pytest.raises(AudioFailure) as err:
        fetch(url, policy, dest, **kw)
    return err.value


def loopback_ok(server: ClipServer, *extra_hosts: str) -> UrlPolicy:
    return UrlPolicy((server.host, *extra_hosts), ("127.0.0.1/32",))


def test_an_allowed_clip_arrives_whole_with_its_checksum(server, tmp_path):
    got = fetch(server.url("clip/call01.m4a"), loopback_ok(server), tmp_path / "a")
    body = (CLIPS_DIR / "call01.m4a").read_bytes()
    assert (tmp_path / "a").read_bytes() == body
    assert got.size == len(body) and got.sha256 == hashlib.sha256(body).hexdigest()
    assert got.redirects == 0


def test_the_request_goes_to_the_address_that_was_checked(server, tmp_path):
    # A name the system cannot resolve: only our resolver's checked answer can reach the server.
    port = server.server_address[1]
    seen = []

    async def resolver(host: str, p: int) -> list[str]:
        seen.append((host, p))
        return ["127.0.0.1"]

    policy = UrlPolicy((f"audio.bcfy.invalid:{port}",), ("127.0.0.1/32",), resolver)
    got = fetch(f"http://audio.bcfy.invalid:{port}/clip/call02.m4a", policy, tmp_path / "a")
    assert got.size == (CLIPS_DIR / "call02.m4a").stat().st_size
    assert seen == [("audio.bcfy.invalid", port)], "resolved once, by us"
    assert server.requests == [("/clip/call02.m4a", f"audio.bcfy.invalid:{port}")]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://calls.broadcastify.com/a.m4a", "disallowed_scheme"),
        ("file:///etc/passwd", "disallowed_scheme"),
        ("https://evil.example.com/a.m4a", "disallowed_host"),
        ("https://calls.broadcastify.com.evil.example/a.m4a", "disallowed_host"),
        ("https://calls.broadcastify.com:8443/a.m4a", "disallowed_host"),
        ("https://user:pw@calls.broadcastify.com/a.m4a", "bad_url"),
    ],
)
def test_urls_outside_the_policy_are_refused_before_any_request(url, code, tmp_path):
    err = failure(url, UrlPolicy(("calls.broadcastify.com",)), tmp_path / "a")
    assert err.code == code and not err.retry


def test_loopback_is_refused_unless_explicitly_allowed(server, tmp_path):
    err = failure(server.url("clip/call01.m4a"), UrlPolicy((server.host,)), tmp_path / "a")
    assert err.code == "internal_address" and not err.retry
    assert "127.0.0.1 is a loopback address" in err.detail
    assert server.requests == []


def test_a_name_resolving_to_a_private_address_is_refused(tmp_path):
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.1.2.3"]  # one bad answer is enough

    policy = UrlPolicy(("calls.broadcastify.com",), (), resolver)
    err = failure("https://calls.broadcastify.com/a.m4a", policy, tmp_path / "a")
    assert err.code == "internal_address"
    assert "10.1.2.3 is a private address (calls.broadcastify.com resolves to it)" in err.detail


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.7/a.m4a", "private"),
        ("http://[::1]:{port}/clip/call01.m4a", "loopback"),
    ],
)
def test_a_redirect_to_an_internal_address_is_refused_even_with_loopback_allowed(
    server, tmp_path, target, kind
):
    port = server.server_address[1]
    target = target.format(port=port)
    host = target.split("/")[2]
    policy = loopback_ok(server, host)  # the host itself is allowed: the address decides
    err = failure(server.url(f"redirect?to={target}"), policy, tmp_path / "a")
    assert err.code == "internal_address" and not err.retry
    assert err.detail.startswith(f"redirect 1 to {target}: ") and f"a {kind} address" in err.detail
    assert len(server.requests) == 1, "the redirect target was never contacted"


def test_a_redirect_to_a_host_not_allowed_is_refused(server, tmp_path):
    target = "https://example.com/a.m4a"
    err = failure(server.url(f"redirect?to={target}"), loopback_ok(server), tmp_path / "a")
    assert err.code == "disallowed_host" and "example.com" in err.detail


def test_an_allowed_redirect_is_followed_and_loops_are_cut(server, tmp_path):
    got = fetch(server.url("redirect?to=/clip/call03.m4a"), loopback_ok(server), tmp_path / "a")
    assert got.redirects == 1 and got.url.endswith("/clip/call03.m4a")
    loop = server.url("redirect?to=" + server.url("redirect?to=/redirect%3Fto%3D/x"))
    err = failure(loop, loopback_ok(server), tmp_path / "b", max_redirects=1)
    assert err.code == "too_many_redirects"


def test_http_errors_wrong_type_and_truncation_have_their_reasons(server, tmp_path):
    policy = loopback_ok(server)
    missing = failure(server.url("missing.m4a"), policy, tmp_path / "a")
    assert missing.code == "http_404" and missing.retry and "404" in missing.detail
    html = failure(server.url("html"), policy, tmp_path / "b")
    assert html.code == "not_audio" and "Content-Type text/html" in html.detail
    cut = failure(server.url("clip/call01.m4a?truncate=1"), policy, tmp_path / "c")
    assert cut.code == "truncated" and cut.retry


@pytest.mark.parametrize("with_length", [True, False])
def test_oversize_bodies_are_cut_at_the_cap(server, tmp_path, with_length):
    url = server.url("oversize?length=1" if with_length else "oversize")
    err = failure(url, loopback_ok(server), tmp_path / "a")
    assert err.code == "too_large" and not err.retry
    written = (tmp_path / "a").stat().st_size if (tmp_path / "a").exists() else 0
    assert written <= CAP, "never more than the cap on disk"
    if with_length:
        assert "Content-Length 31457281 exceeds 1000000 bytes" in err.detail
    else:
        assert "exceeds 1000000 bytes" in err.detail
