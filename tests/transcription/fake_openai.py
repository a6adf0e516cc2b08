"""A local OpenAI-compatible transcription service over real HTTP, for tests.

`POST /v1/audio/transcriptions` records each request (headers, multipart fields, the uploaded
file) and answers with the next scripted reply, or a default verbose_json answer. A reply can
hold the request until the test releases it: how a test catches a worker mid-task.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = "/v1/audio/transcriptions"


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str -> as is; None -> DEFAULT_ANSWER
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: threading.Event | None = None  # answer only once this is set


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    fields: dict[str, str]
    file_name: str | None
    file_type: str | None
    file_bytes: bytes


def verbose_json(segments: list[dict[str, Any]], language: str = "english") -> dict[str, Any]:
    return {
        "task": "transcribe",
        "language": language,
        "duration": max((s["end"] for s in segments), default=0.0),
        "text": " ".join(s["text"].strip() for s in segments),
        "segments": [
            {
                "id": i,
                "seek": 0,
                "tokens": [],
                "temperature": 0.0,
                "compression_ratio": 1.2,
                "avg_logprob": -0.2,
                "no_speech_prob": 0.01,
                **s,
            }
            for i, s in enumerate(segments)
        ],
    }


DEFAULT_ANSWER = verbose_json(
    [{"start": 0.0, "end": 4.2, "text": " Engine 12 respond to a structure fire."}]
)


class FakeTranscriptionService:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.request_times: list[float] = []  # time.monotonic() of each arrival
        self.replies: list[Reply] = []
        self.default = Reply()
        self.arrived = threading.Condition()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                request = _parse(self.path, dict(self.headers.items()), raw)
                with service.arrived:
                    service.requests.append(request)
                    service.request_times.append(time.monotonic())
                    reply = service.replies.pop(0) if service.replies else service.default
                    service.arrived.notify_all()
                if self.path != PATH:
                    reply = Reply(404, {"error": {"message": f"no route {self.path}"}})
                if reply.hold is not None:
                    reply.hold.wait(120)
                if reply.delay:
                    threading.Event().wait(reply.delay)
                body = reply.body if reply.body is not None else DEFAULT_ANSWER
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(reply.status)
                    ctype = "text/plain" if isinstance(body, str) else "application/json"
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a killed worker)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def wait_for_requests(self, n: int, timeout: float = 30) -> list[Request]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"timed out waiting for {n} requests ({len(self.requests)})")
            return list(self.requests)

    def start(self) -> FakeTranscriptionService:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parse(path: str, headers: dict[str, str], raw: bytes) -> Request:
    ctype = headers.get("Content-Type", "")
    fields: dict[str, str] = {}
    file_name = file_type = None
    file_bytes = b""
    if ctype.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw
        )
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                file_name, file_type, file_bytes = (
                    part.get_filename(),
                    part.get_content_type(),
                    payload,
                )
            else:
                fields[str(name)] = payload.decode()
    return Request(path, headers, fields, file_name, file_type, file_bytes)


@contextmanager
def fake_service() -> Iterator[FakeTranscriptionService]:
    service = FakeTranscriptionService().start()
    try:
        yield service
    finally:
        service.stop()
