"""The safe downloader against the feed simulator over real HTTP: only allowed hosts and public
addresses (loopback only by explicit opt-in), every redirect re-checked, the checked address is
the one connected to, the size cap with and without Content-Length, precise reasons."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

import httpx
import pytest

from workers.audio.download import AudioFailure, UrlPolicy, download
from workers.dev.calls import CLIPS
from workers.dev.simulator import AudioFault, FeedSimulator

CAP = 1_000_000


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


def checked(url: str, policy: UrlPolicy) -> AudioFailure:
    with pytest.raises(AudioFailure) as err:
        asyncio.run(policy.check(url))
    return err.value


def loopback_ok(sim: FeedSimulator, *extra_hosts: str) -> UrlPolicy:
    return UrlPolicy((sim.audio_host, *extra_hosts), ("127.0.0.1/32",))


def call_url(sim: FeedSimulator, fault: AudioFault = AudioFault.OK) -> tuple[str, dict]:
    record = sim.publish_call(sim.add_playlist(), audio=fault)
    return record["url"], record


def test_an_allowed_clip_arrives_whole_with_its_checksum(sim, tmp_path):
    url, record = call_url(sim)
    got = fetch(url, loopback_ok(sim), tmp_path / "a")
    body = (tmp_path / "a").read_bytes()
    assert body in {c.data for c in CLIPS} and len(body) == record["size"]
    assert got.size == record["size"] and got.sha256 == hashlib.sha256(body).hexdigest()
    assert got.redirects == 0


def test_the_request_goes_to_the_address_that_was_checked(sim, tmp_path):
    # A name the system cannot resolve: only our resolver's checked answer reaches the server.
    url, record = call_url(sim)
    port = int(sim.audio_host.rsplit(":", 1)[1])
    seen = []

    async def resolver(host: str, p: int) -> list[str]:
        seen.append((host, p))
        return ["127.0.0.1"]

    policy = UrlPolicy((f"audio.bcfy.invalid:{port}",), ("127.0.0.1/32",), resolver)
    named = url.replace(sim.audio_host, f"audio.bcfy.invalid:{port}")
    got = fetch(named, policy, tmp_path / "a")
    assert got.size == record["size"]
    assert seen == [("audio.bcfy.invalid", port)], "resolved once, by us"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://calls.broadcastify.com/a.m4a", "disallowed_scheme"),
        ("file:///etc/passwd", "disallowed_scheme"),
        ("https://evil.example.com/a.m4a", "disallowed_host"),
        ("https://calls.broadcastify.com.evil.example/a.m4a", "disallowed_host"),
        ("https://calls.broadcastify.com:8443/a.m4a", "disallowed_host"),
        ("https://user:pw@calls.broadcastify.com/a.m4a", "bad_url"),
        ("http://169.254.169.254/latest/meta-data/", "internal_address"),
        ("http://10.0.0.7/a.m4a", "internal_address"),
        ("http://[::1]:8080/a.m4a", "internal_address"),
        ("http://[::ffff:127.0.0.1]/a.m4a", "internal_address"),
    ],
)
def test_urls_outside_the_policy_are_refused_before_any_request(url, code, tmp_path):
    err = failure(url, UrlPolicy(("calls.broadcastify.com",)), tmp_path / "a")
    assert err.code == code and not err.retry


def test_an_internal_address_is_refused_even_when_its_host_is_allowed():
    # Loopback allowed for the simulator does not open link-local, private or IPv6 loopback.
    policy = UrlPolicy(("169.254.169.254", "10.0.0.7", "[::1]"), ("127.0.0.1/32",))
    for url, kind in [
        ("http://169.254.169.254/x", "link-local"),
        ("http://10.0.0.7/x", "private"),
        ("http://[::1]/x", "loopback"),
    ]:
        err = checked(url, policy)
        assert err.code == "internal_address" and f"a {kind} address" in err.detail


def test_loopback_is_refused_unless_explicitly_allowed(sim, tmp_path):
    url, _ = call_url(sim)
    err = failure(url, UrlPolicy((sim.audio_host,)), tmp_path / "a")
    assert err.code == "internal_address" and not err.retry
    assert "127.0.0.1 is a loopback address" in err.detail
    assert sim.requests["audio"] == 0


def test_a_name_resolving_to_a_private_address_is_refused(tmp_path):
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.1.2.3"]  # one bad answer is enough

    policy = UrlPolicy(("calls.broadcastify.com",), (), resolver)
    err = failure("https://calls.broadcastify.com/a.m4a", policy, tmp_path / "a")
    assert err.code == "internal_address"
    assert "10.1.2.3 is a private address (calls.broadcastify.com resolves to it)" in err.detail


def test_a_redirect_to_the_metadata_address_is_refused_with_loopback_allowed(sim, tmp_path):
    url, _ = call_url(sim, AudioFault.REDIRECT_INTERNAL)
    err = failure(url, loopback_ok(sim, "169.254.169.254"), tmp_path / "a")
    assert err.code == "internal_address" and not err.retry
    assert err.detail.startswith("redirect 1 to http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254 is a link-local address" in err.detail
    assert sim.requests["audio"] == 1, "only the redirecting answer was fetched"


def test_an_allowed_redirect_is_followed_and_the_count_is_limited(sim, tmp_path):
    url, record = call_url(sim, AudioFault.REDIRECT_OK)
    got = fetch(url, loopback_ok(sim), tmp_path / "a")
    assert got.redirects == 1 and "/audio/r/" in got.url and got.size == record["size"]
    err = failure(url, loopback_ok(sim), tmp_path / "b", max_redirects=0)
    assert err.code == "too_many_redirects"


def test_missing_and_wrong_type_have_their_reasons(sim, tmp_path):
    missing = failure(call_url(sim, AudioFault.MISSING)[0], loopback_ok(sim), tmp_path / "a")
    assert missing.code == "http_404" and missing.retry and "answered 404" in missing.detail
    html = failure(call_url(sim, AudioFault.WRONG_TYPE)[0], loopback_ok(sim), tmp_path / "b")
    assert html.code == "not_audio" and "Content-Type text/html" in html.detail


@pytest.mark.parametrize("fault", [AudioFault.OVERSIZE, AudioFault.OVERSIZE_UNDECLARED])
def test_oversize_bodies_are_cut_at_the_cap(sim, tmp_path, fault):
    err = failure(call_url(sim, fault)[0], loopback_ok(sim), tmp_path / "a")
    assert err.code == "too_large" and not err.retry
    written = (tmp_path / "a").stat().st_size if (tmp_path / "a").exists() else 0
    assert written <= CAP, "never more than the cap on disk"
    if fault is AudioFault.OVERSIZE:
        assert f"Content-Length {32 * 1024 * 1024} exceeds {CAP} bytes" in err.detail
    else:
        assert f"body exceeds {CAP} bytes (no Content-Length)" in err.detail


def test_a_connection_dropped_mid_body_is_truncated(tmp_path):
    # The simulator's TRUNCATED sends an honest, short length (the pipeline catches that, see
    # test_audio_prepare); a peer that hangs up early needs a socket that does just that.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        body = CLIPS[0].data
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/mp4\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body[: len(body) // 2])
        )
        conn.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    policy = UrlPolicy((f"127.0.0.1:{port}",), ("127.0.0.1/32",))
    err = failure(f"http://127.0.0.1:{port}/a.m4a", policy, tmp_path / "a")
    thread.join(5)
    listener.close()
    assert err.code == "truncated" and err.retry
    assert f"expected {CLIPS[0].size}" in err.detail
