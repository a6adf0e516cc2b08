"""An aiohttp web server on its own event loop in a background thread: the HTTP side of the feed
simulator and of the tests' fake services, so that none of them parses or writes HTTP by hand.

    server = BackgroundServer(handle, host="127.0.0.1", port=0)  # bound here (OSError here)
    server.start()      # serving; server.port is the bound port
    ...
    server.stop()       # the listening socket, every connection and the thread are gone

`handle` is aiohttp's low-level handler: `async def handle(request: web.BaseRequest) ->
web.StreamResponse`. Code that blocks (a lock, a test holding a request back, `time.sleep`)
runs through `server.in_thread(fn, ...)`: on a thread of its own, from a pool that grows so
that no call ever waits for another (as http.server's ThreadingHTTPServer did), made of
daemon threads so that a call still held at exit does not hold the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# How long stop() lets answers in progress finish before it cuts their connections.
SHUTDOWN_GRACE_SEC = 0.5


class BackgroundServer:
    """Listens from construction (so the port is known and a taken one fails at once); serves
    from start() to stop(), each at most once."""

    def __init__(
        self,
        handle: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "http-server",
        keepalive_timeout: float = 120.0,  # an idle kept-alive connection is closed after this
    ) -> None:
        self._sock = socket.create_server((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._handle, self._name = handle, name
        self._keepalive_timeout = keepalive_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._pool = _DaemonPool(f"{name}-call")

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=self._name, daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._failed is not None:
            self._thread.join()
            raise self._failed

    def stop(self) -> None:
        if self._thread is None:
            self._sock.close()
            self._pool.close()
            return
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        self._pool.close()

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread, awaited on the server's loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            if not done.done():  # else the request was cancelled (the server is stopping)
                outcome()

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # handed over to the request, which raises it
                error = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(settle, lambda: done.set_exception(error))
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

        self._pool.submit(run)
        return await done

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            runner = loop.run_until_complete(self._open())
        except BaseException as exc:  # handed to start(), which raises it
            self._failed = exc
            self._sock.close()
            loop.close()
            return
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            # Closes the listening socket and every connection; then ends what is left.
            loop.run_until_complete(runner.cleanup())
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> web.ServerRunner:
        server = web.Server(
            self._handle, access_log=None, keepalive_timeout=self._keepalive_timeout
        )
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_SEC)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        return runner


class _DaemonPool:
    """Daemon threads for blocking calls: an idle one takes the next call, else a new one is
    started, so a call never queues behind a held one. close() ends each as it becomes idle."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads at (or on their way to) the queue with no call promised
        self._threads = 0

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            else:
                self._threads += 1
                threading.Thread(target=self._work, name=self._name, daemon=True).start()
        self._calls.put(call)

    def close(self) -> None:
        with self._lock:
            for _ in range(self._threads):
                self._calls.put(None)
            self._threads = self._idle = 0

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call()
            with self._lock:
                self._idle += 1
