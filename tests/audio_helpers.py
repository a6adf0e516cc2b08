"""Helpers for the audio tests: calls in the database, and (until the feed simulator lands)
a small HTTP server that serves the committed clips and the faults the audio stage must survive.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import psycopg

from workers.simulator.make_clips import CLIPS_DIR

CLIPS = json.loads((CLIPS_DIR / "clips.json").read_text())["clips"]
OVERSIZE_BYTES = 30 * 1024 * 1024 + 1


class _Handler(BaseHTTPRequestHandler):
    server: ClipServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.requests.append((self.path, self.headers.get("Host")))
        if self.server.latency:
            time.sleep(self.server.latency)
        kind, _, name = parts.path.strip("/").partition("/")
        if kind == "clip":
            body = (CLIPS_DIR / name).read_bytes()
            if query.get("truncate"):
                self._send(200, "audio/mp4", body[: len(body) // 2], length=len(body))
                return
            self._send(200, "audio/mp4", body)
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", query["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "html":
            self._send(200, "text/html; charset=utf-8", b"<html><body>Not found</body></html>")
        elif kind == "oversize":
            self.send_response(200)
            self.send_header("Content-Type", "audio/mp4")
            if query.get("length"):
                self.send_header("Content-Length", str(OVERSIZE_BYTES))
            self.end_headers()
            block = b"\0" * 65536
            try:
                for _ in range(OVERSIZE_BYTES // len(block) + 1):
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        else:
            self._send(404, "text/plain", b"no such file")

    def _send(self, status: int, ctype: str, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        if length is not None:
            self.close_connection = True


class ClipServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.latency = latency
        self.requests: list[tuple[str, str | None]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return f"http://{self.host}/{path.lstrip('/')}"

    def start(self) -> ClipServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def clip_server(latency: float = 0.0) -> Iterator[ClipServer]:
    server = ClipServer(latency).start()
    try:
        yield server
    finally:
        server.stop()


def insert_call(
    conn: psycopg.Connection,
    url: str,
    duration: float | None,
    *,
    playlist: uuid.UUID | None = None,
    started_at: datetime | None = None,
) -> int:
    started_at = started_at or datetime.now(UTC)
    ts = int(started_at.timestamp())
    row = conn.execute(
        "INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at, duration_sec,"
        " url, raw) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            playlist,
            "1-100",
            ts,
            started_at,
            duration,
            url,
            json.dumps({"url": url, "ts": ts, "duration": duration}),
        ),
    ).fetchone()
    assert row is not None
    return row[0]


def audio_rows(conn: psycopg.Connection) -> dict[int, dict]:
    cur = conn.execute("SELECT * FROM call_audio ORDER BY call_id")
    names = [d.name for d in cur.description or []]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def truncate_calls(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE bcfy_calls_raw, call_audio, call_audio_attempts")
