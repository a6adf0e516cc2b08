"""A local OpenAI-compatible transcription service over real HTTP (aiohttp), for tests.

`POST /v1/audio/transcriptions` records each request (headers, multipart fields, the uploaded
file) and answers with the next scripted reply, or a default verbose_json answer. A reply can
hold the request until the test releases it: how a test catches a worker mid-task.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from workers.dev.http_server import BackgroundServer

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
    headers: Mapping[str, str]  # names in any case
    fields: dict[str, str]  # a field sent more than once: its last value
    file_name: str | None
    file_type: str | None
    file_bytes: bytes
    repeated: dict[str, list[str]] = field(default_factory=dict)  # every value of each field


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
        self.server = BackgroundServer(self._serve, name="fake-openai")

    async def _serve(self, http: web.BaseRequest) -> web.StreamResponse:
        request = await _parse(http)
        with self.arrived:
            self.requests.append(request)
            self.request_times.append(time.monotonic())
            reply = self.replies.pop(0) if self.replies else self.default
            self.arrived.notify_all()
        if http.raw_path != PATH:
            reply = Reply(404, {"error": {"message": f"no route {http.raw_path}"}})
        if reply.hold is not None:
            await self.server.in_thread(reply.hold.wait, 120)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        body = reply.body if reply.body is not None else DEFAULT_ANSWER
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        ctype = "text/plain" if isinstance(body, str) else "application/json"
        return web.Response(
            status=reply.status, body=data, headers={"Content-Type": ctype, **reply.headers}
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def wait_for_requests(self, n: int, timeout: float = 30) -> list[Request]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"timed out waiting for {n} requests ({len(self.requests)})")
            return list(self.requests)

    def start(self) -> FakeTranscriptionService:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


async def _parse(http: web.BaseRequest) -> Request:
    fields: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    file_name = file_type = None
    file_bytes = b""
    form = await http.post()  # multipart (or urlencoded) fields, parsed by aiohttp
    for name, value in form.items():
        if isinstance(value, web.FileField):
            file_name, file_type, file_bytes = value.filename, value.content_type, value.file.read()
        else:
            fields[name] = str(value)
            repeated.setdefault(name, []).append(str(value))
    await http.read()
    headers = CIMultiDict(http.headers)
    return Request(http.raw_path, headers, fields, file_name, file_type, file_bytes, repeated)


@contextmanager
def fake_service() -> Iterator[FakeTranscriptionService]:
    service = FakeTranscriptionService().start()
    try:
        yield service
    finally:
        service.stop()
