"""Alert rules, calls with transcripts stored the way the transcription stage stores them, and a
receiver: a real HTTP server (aiohttp, on a background thread) that records every request and
answers as a test tells it to."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Services
from workers.cli.main import main
from workers.core.runtime import Runtime
from workers.core.settings import Settings, load_settings, reset_settings_cache
from workers.dev.http_server import BackgroundServer

FIRE = uuid.UUID("11111111-2222-3333-4444-555555555555")
POLICE = uuid.UUID("99999999-8888-7777-6666-555555555555")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


@dataclass
class Receiver:
    """Every request, in order; answers per path: a script of (status, headers) answers, or
    "hold" (the request waits until `release()`), then 200."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str]] | str]] = field(default_factory=dict)
    held: threading.Event = field(default_factory=threading.Event)
    release_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *answers: tuple[int, dict[str, str]] | str) -> None:
        self.scripts[path] = list(answers)

    def release(self) -> None:
        self.release_event.set()

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"raw": raw.decode(errors="replace")}
        with self.lock:
            self.requests.append(Received(request.path, dict(request.headers), body))
            script = self.scripts.get(request.path) or []
            answer = script.pop(0) if script else (200, {})
        if answer == "hold":
            self.held.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release_event.wait, 60)
            answer = (200, {})
        assert not isinstance(answer, str)
        status, headers = answer
        return web.Response(status=status, headers=headers, text="{}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = BackgroundServer(rec.handle, name="alert-receiver")
    rec.port = server.port
    server.start()
    try:
        yield rec
    finally:
        rec.release()
        server.stop()


@dataclass
class Alerts:
    services: Services
    capsys: pytest.CaptureFixture[str]
    set_env: Callable[..., Settings]

    def cli(self, *args: str) -> tuple[int, str, str]:
        reset_settings_cache()
        code = main(["alerts", *args])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def add(self, name: str, query: str, *targets: str, **options: str) -> None:
        flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
        notify = [x for t in targets for x in ("--notify", t)]
        code, out, err = self.cli("add", name, "--query", query, *flags, *notify)
        assert code == 0, out + err

    def call(
        self,
        text: str,
        *,
        playlist: uuid.UUID | None = FIRE,
        group: str = "7001-101",
        confidence: float | None = 0.9,
        ago: timedelta = timedelta(seconds=30),
    ) -> int:
        """A call, its transcript stored as the transcription stage stores it."""
        started = datetime.now(UTC) - ago
        with self.services.db() as conn:
            row = conn.execute(
                """INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at,
                                               duration_sec, url, display, raw)
                   VALUES (%s, %s, %s, %s, 5.0, %s, 'Fire Dispatch', '{}') RETURNING id""",
                (
                    playlist,
                    group,
                    int(started.timestamp()),
                    started,
                    f"https://calls.example/{uuid.uuid4().hex}.m4a",
                ),
            ).fetchone()
        assert row is not None
        call_id = int(row[0])
        self.store(call_id, text, confidence)
        return call_id

    def store(self, call_id: int, text: str, confidence: float | None = 0.9) -> Any:
        from tasks.transcription.claims import store_transcript
        from workers.recognizers import Recognition

        rt = Runtime.current()
        recognition = Recognition(text, "test", "en", confidence)
        return rt.run(
            store_transcript(
                call_id, "pocketsphinx", recognition, 0.1, rt.settings.alerts.max_per_minute
            )
        )

    def deliver(self, worker: str = "test:nohost:1") -> dict[str, int]:
        from workers.alerts.delivery import deliver_due

        rt = Runtime.current()
        return rt.run(deliver_due(rt.settings.alerts, rt.http, worker, 30))

    def sweep(self) -> Any:
        from workers.alerts.delivery import sweep_outbox

        rt = Runtime.current()
        return rt.run(sweep_outbox(rt.settings.alerts))

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.services.db() as conn:
            return conn.execute(sql, params).fetchall()

    def outbox(self) -> list[tuple[Any, ...]]:
        """(rule name, call id, state) of every outbox row."""
        return self.rows(
            "SELECT r.name, o.call_id, o.state FROM alert_outbox o"
            " JOIN alert_rules r ON r.id = o.rule_id ORDER BY o.id"
        )

    def deliveries(self) -> list[tuple[Any, ...]]:
        """(rule, target shown, state, attempts, last_error) of every delivery."""
        return self.rows(
            "SELECT r.name, t.shown, d.state, d.attempts, d.last_error FROM alert_deliveries d"
            " JOIN alert_outbox o ON o.id = d.outbox_id JOIN alert_rules r ON r.id = o.rule_id"
            " JOIN alert_targets t ON t.id = d.target_id ORDER BY d.id"
        )

    def make_due(self) -> None:
        with self.services.db() as conn:
            conn.execute("UPDATE alert_deliveries SET due_at = now() WHERE state = 'pending'")


@pytest.fixture
def alerts(
    clean: Services, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Alerts]:
    """No calls, rules or playlists but two (County Fire, Metro PD); settings of this process
    set by `alerts.set_env(NAME=value)`."""
    with clean.db() as conn:
        conn.execute("TRUNCATE bcfy_calls_raw, bcfy_playlists, alert_rules CASCADE")
        conn.execute(
            "INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'County Fire'), (%s, 'Metro PD')",
            (FIRE, POLICE),
        )

    def set_env(**env: str) -> Settings:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        reset_settings_cache()
        Runtime.shutdown_current()
        return load_settings()

    set_env(ALERT_RETRY_BASE_SEC="0.1", ALERT_SEND_TIMEOUT_SEC="2")
    yield Alerts(clean, capsys, set_env)
    Runtime.shutdown_current()
    reset_settings_cache()
