"""The per-process runtime: one event loop, one database pool, one HTTP client, one Redis client.

Celery's prefork pool forks its children from the main worker process. Sockets, event loops and
connection pools must not cross a fork, so everything here is made lazily in the process that
uses it (checked by pid) and closed when that process shuts down. Job bodies are `async def`;
`Runtime.run()` drives one to completion on the process's loop (`run_to_completion`, the one way
synchronous code here runs a coroutine).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import psycopg
import redis
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from workers.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.clients.broadcastify import BroadcastifyClient

log = logging.getLogger(__name__)

T = TypeVar("T")


class Runtime:
    """What one worker process's job bodies share. Use `Runtime.current()`."""

    _instance: Runtime | None = None

    def __init__(self, settings: Settings) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._db: AsyncConnectionPool | None = None
        self._http: httpx.AsyncClient | None = None
        self._redis: redis.Redis | None = None
        self._bcfy_api: BroadcastifyClient | None = None

    @classmethod
    def current(cls) -> Runtime:
        """This process's runtime, made on first use after any fork."""
        rt = cls._instance
        if rt is None or rt.pid != os.getpid():
            # A runtime inherited across fork belongs to the parent: never touch its sockets.
            rt = cls._instance = Runtime(get_settings())
        return rt

    @classmethod
    def shutdown_current(cls) -> None:
        rt = cls._instance
        if rt is not None and rt.pid == os.getpid():
            rt.close()
        cls._instance = None

    # --- resources ---------------------------------------------------------------------

    async def open_db(self) -> AsyncConnectionPool:
        """The process's PostgreSQL pool, opened on first use on this process's loop."""
        if self._db is None:
            s = self.settings
            pool = AsyncConnectionPool(
                s.services.database_url.reveal(),
                min_size=s.services.db_pool_min_size,
                max_size=s.services.db_pool_max_size,
                timeout=s.services.db_connect_timeout_sec,
                kwargs={
                    "autocommit": False,
                    "connect_timeout": int(s.services.db_connect_timeout_sec),
                },
                name=f"bcfy-{self.pid}",
                open=False,
            )
            await pool.open(wait=False)
            self._db = pool
        return self._db

    @property
    def http(self) -> httpx.AsyncClient:
        """The process's HTTP client; every request has connect, read and pool timeouts."""
        if self._http is None:
            s = self.settings
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    connect=s.services.http_connect_timeout_sec,
                    read=s.services.http_read_timeout_sec,
                    write=s.services.http_read_timeout_sec,
                    pool=s.services.http_connect_timeout_sec,
                ),
                follow_redirects=False,
                headers={"User-Agent": "bcfy-pipeline/0.1"},
            )
        return self._http

    @property
    def bcfy_api(self) -> BroadcastifyClient:
        """The process's Broadcastify API client (on `http`; caches its token across runs)."""
        if self._bcfy_api is None:
            from workers.clients.broadcastify import BroadcastifyClient

            self._bcfy_api = BroadcastifyClient.from_settings(self.settings, self.http)
        return self._bcfy_api

    @property
    def redis(self) -> redis.Redis:
        """A synchronous Redis client for locks and counters (used outside the event loop)."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.services.redis_url.reveal(),
                socket_timeout=5,
                socket_connect_timeout=5,
                health_check_interval=30,
            )
        return self._redis

    # --- running coroutines --------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine to completion on this process's loop (from synchronous code)."""
        return run_to_completion(self.loop, coro)

    def close(self) -> None:
        """Close the pool and clients on their own loop, then the loop."""
        loop = self.loop
        if loop.is_closed():
            return
        try:
            if self._http is not None:
                loop.run_until_complete(self._http.aclose())
            if self._db is not None:
                loop.run_until_complete(self._db.close(timeout=5))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            log.exception("runtime: error while closing resources")
        finally:
            if self._redis is not None:
                self._redis.close()
            loop.close()
            self._http = self._db = self._redis = None
            self._bcfy_api = None


# How long an interrupted coroutine is given to unwind (close its connections and files).
UNWIND_SEC = 5.0


def run_to_completion(
    loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, T] | asyncio.Task[T]
) -> T:
    """Run a coroutine (or a task already made on `loop`) to completion from synchronous code.

    If something from outside the loop interrupts it (Celery's soft time limit raises in the
    main thread), the task is cancelled and given up to UNWIND_SEC to unwind, so that its
    connections and files are given back; then the interruption is raised again."""
    task = work if isinstance(work, asyncio.Task) else loop.create_task(work)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            try:
                loop.run_until_complete(asyncio.wait([task], timeout=UNWIND_SEC))
            except BaseException:  # the interruption matters more
                log.exception("runtime: %s did not unwind cleanly", task.get_name())
        raise


_pool_child_pid: int | None = None


def mark_pool_child() -> None:
    """Called in each prefork child as it starts (Celery's worker_process_init)."""
    global _pool_child_pid
    _pool_child_pid = os.getpid()


def in_pool_child() -> bool:
    return _pool_child_pid == os.getpid()


@asynccontextmanager
async def db_connection() -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
    """Borrow a connection from this process's pool; it always goes back.

    Commits when the block ends normally and rolls back on an exception. Keep the block short:
    never await an HTTP call inside it.
    """
    pool = await Runtime.current().open_db()
    async with pool.connection() as conn:
        yield conn
