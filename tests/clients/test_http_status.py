"""One HTTP status classification (workers.clients.http) for the three clients of outside
services: each, asked over real HTTP by a server that answers a given status, treats it as the
classification says: the Broadcastify client retries a transient status and not a permanent one,
the transcription service's client raises a transient or a permanent error, and the audio
download honours the Retry-After of a transient answer only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.audio.download import AudioFailure, UrlPolicy, download
from workers.clients.broadcastify import BroadcastifyClient, BroadcastifyError, TransientError
from workers.clients.http import StatusClass, status_class
from workers.core.settings import load_settings
from workers.recognizers import PermanentRecognitionError, TransientRecognitionError
from workers.recognizers.openai_backend import OpenAIRecognizer

STATUSES = st.integers(min_value=200, max_value=599).filter(
    lambda s: s not in (204, 205, 304) and not 300 <= s < 400
)


class StatusServer(ThreadingHTTPServer):
    """Answers every request with `statuses` in turn (the last one again once used up), its
    `retry_after` as Retry-After and a small JSON body."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses: list[int] = [200]
        self.retry_after = "7"
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        srv = self.server
        status = srv.statuses[min(srv.requests, len(srv.statuses) - 1)]
        srv.requests += 1
        body = b'{"text": "ok", "countries": []}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", srv.retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[StatusServer]:
    srv = StatusServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _settings(base: str):
    return load_settings(
        {
            "BCFY_API_BASE": base,
            "BCFY_API_KEY_ID": "k",
            "BCFY_API_KEY": "s",
            "BCFY_APP_ID": "a",
            "BCFY_RETRY_ATTEMPTS": "2",
            "BCFY_RETRY_BACKOFF_SEC": "0.01",
            "BCFY_RETRY_BACKOFF_MAX_SEC": "0.02",
            "BCFY_RETRY_BUDGET_SEC": "0.5",
            "TRANSCRIBE_BACKEND": "openai",
            "TRANSCRIBE_OPENAI_BASE_URL": base,
            "TRANSCRIBE_OPENAI_MODEL": "whisper-1",
        }
    )


def _broadcastify(server: StatusServer, status: int) -> object:
    """What the Broadcastify client makes of `status` then a 200 (a retry may follow at once:
    Retry-After 0)."""
    server.statuses, server.requests, server.retry_after = [status, 200], 0, "0"

    async def go() -> object:
        async with httpx.AsyncClient(timeout=5) as http:
            api = BroadcastifyClient.from_settings(_settings(server.url), http)
            try:
                return await api.countries()
            except BroadcastifyError as exc:
                return exc

    return asyncio.run(go())


def _openai(server: StatusServer, status: int) -> Exception | None:
    server.statuses, server.requests, server.retry_after = [status], 0, "7"
    recognizer = OpenAIRecognizer(_settings(server.url).transcription)

    async def go() -> Exception | None:
        async with httpx.AsyncClient(timeout=5) as http:
            try:
                await recognizer.transcribe_bytes(http, b"fLaC", "x.flac")
            except Exception as exc:
                return exc
            return None

    return asyncio.run(go())


def _download(server: StatusServer, status: int, dest: Path) -> AudioFailure | None:
    server.statuses, server.requests, server.retry_after = [status], 0, "7"
    policy = UrlPolicy((f"127.0.0.1:{server.server_address[1]}",), ("127.0.0.1/32",))

    async def go() -> AudioFailure | None:
        async with httpx.AsyncClient(timeout=5) as http:
            try:
                await download(
                    http,
                    server.url + "/a.m4a",
                    dest,
                    policy,
                    max_bytes=10_000,
                    max_redirects=0,
                    timeout_sec=5,
                )
            except AudioFailure as exc:
                return exc
            return None

    return asyncio.run(go())


@settings(max_examples=40, deadline=None)
@given(status=STATUSES)
def test_the_three_clients_follow_one_classification(server, tmp_path_factory, status):
    kind = status_class(status)

    got = _broadcastify(server, status)
    if kind is StatusClass.SUCCESS:
        assert got == [] and server.requests == 1
    elif kind is StatusClass.TRANSIENT:
        assert got == [] and server.requests == 2, f"{status}: retried, then answered"
    else:
        assert isinstance(got, BroadcastifyError) and not isinstance(got, TransientError)
        assert got.status == status and server.requests == 1, f"{status}: not retried"

    err = _openai(server, status)
    if kind is StatusClass.SUCCESS:
        assert err is None
    elif kind is StatusClass.TRANSIENT:
        assert isinstance(err, TransientRecognitionError) and err.retry_after == 7
    else:
        assert isinstance(err, PermanentRecognitionError), status

    if status != 200:
        failure = _download(server, status, tmp_path_factory.mktemp("d") / "a.m4a")
        assert failure is not None and failure.code == f"http_{status}" and failure.retry
        assert failure.retry_after == (7 if kind is StatusClass.TRANSIENT else None), status


@pytest.mark.parametrize("status", [408, 425, 500, 502, 504])
def test_transient_statuses_agree_across_clients(server, tmp_path, status):
    """Examples the property test may not draw: before one classification, the Broadcastify
    client failed 408 and 425 at once and the download ignored Retry-After on 500, 502, 504."""
    assert _broadcastify(server, status) == [] and server.requests == 2
    assert isinstance(_openai(server, status), TransientRecognitionError)
    failure = _download(server, status, tmp_path / "a.m4a")
    assert failure is not None and failure.retry_after == 7
