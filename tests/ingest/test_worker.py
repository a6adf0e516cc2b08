"""The ingest and back-fill jobs in a real worker process, triggered as beat and the poll job
trigger them, against the simulator on the real clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Services
from tests.support.env import http_timeouts
from tests.support.ingest import TABLES, api_env, follow_with_cli
from tests.support.procs import start_worker
from workers.core.rows import one_row
from workers.dev.procs import wait_until
from workers.dev.simulator import FeedSimulator

pytestmark = pytest.mark.slow

POLL = "tasks.ingest.poll_followed_playlists"
BACKFILL = "tasks.ingest.backfill_gaps"


@pytest.fixture
def setup(clean: Services, tmp_path: Path) -> Iterator[tuple[FeedSimulator, dict[str, str]]]:
    with clean.db() as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
    with FeedSimulator(seed=11) as sim:
        env = clean.worker_env(
            tmp_path,
            **api_env(sim),
            LOCK_TTL_SEC="6",
            LOCK_RENEW_SEC="2",
            INGEST_LIVE_MAX_POS_AGE_SEC="120",
            BCFY_RETRY_BUDGET_SEC="10",
            **http_timeouts(10),
        )
        yield sim, env


def count(services: Services, query: str) -> int:
    with services.db() as conn:
        (n,) = one_row(conn.execute(query).fetchone())
    return int(n)


def test_a_worker_polls_on_trigger_stores_every_call_and_backfills(
    setup, clean, procs, client, tmp_path
):
    sim, env = setup
    uuid = sim.add_playlist(calls_per_minute=90)
    sim.publish_call(uuid)
    time.sleep(1.5)
    follow_with_cli(env, uuid)
    procs.append(start_worker("ingest1", env, tmp_path, queues="ingest", concurrency=2))

    client.send_task(POLL, queue="ingest")
    wait_until(
        lambda: count(clean, "SELECT count(*) FROM bcfy_playlist_poll_log") == 1, 30, "a poll"
    )
    time.sleep(5.5)  # the service's 5 s rule
    client.send_task(POLL, queue="ingest")
    wait_until(
        lambda: count(clean, "SELECT count(*) FROM bcfy_playlist_poll_log") == 2,
        30,
        "a second poll",
    )
    wait_until(lambda: len(clean.job_runs(POLL)) == 2, 10, "both runs recorded")

    # Everything served is stored, once; each record read once.
    with clean.db() as conn:
        stored = [u for (u,) in conn.execute("SELECT url FROM bcfy_calls_raw").fetchall()]
        modes = [m for (m,) in conn.execute("SELECT mode FROM bcfy_playlist_poll_log ORDER BY id")]
    served = [c["url"] for c in sim.calls(uuid) if sim.served_count(c)]
    assert len(stored) >= 5 and sorted(stored) == sorted(served)
    assert sim.billed_records == len(stored)
    assert modes == ["init", "pos"]
    assert all(r.outcome == "ok" and r.worker.startswith("ingest1@") for r in clean.job_runs(POLL))
    # The audio job was told, by name, on its own queue.
    queued = clean.queued_tasks("audio")
    assert queued and set(queued) == {"tasks.audio.process_pending_audio"}

    # Down longer than the service keeps a cursor: the next poll records the gap, triggers
    # the back-fill job, which the worker runs; nothing lost, nothing read twice.
    sim.faults.max_pos_age = 120
    with clean.db() as conn:
        (rewound,) = conn.execute(
            "UPDATE bcfy_playlists SET cursor_pos = cursor_pos - 400 RETURNING cursor_pos"
        ).fetchone()
        conn.execute("DELETE FROM bcfy_calls_raw WHERE call_ts > %s", (rewound,))
    sim.reset_counters()
    time.sleep(5.5)
    client.send_task(POLL, queue="ingest")
    wait_until(
        lambda: (
            len(clean.job_runs(BACKFILL)) >= 1
            and count(clean, "SELECT count(*) FROM bcfy_backfill") == 0
        ),
        30,
        "the back-fill job to run and close the gap",
    )
    with clean.db() as conn:
        (cursor,) = conn.execute("SELECT cursor_pos FROM bcfy_playlists").fetchone()
        stored = [u for (u,) in conn.execute("SELECT url FROM bcfy_calls_raw").fetchall()]
    assert len(stored) == len(set(stored))
    gap = [c for c in sim.calls(uuid) if rewound < c["ts"] <= cursor]
    assert len(gap) >= 10  # every call so far: the playlist is younger than 400 s
    assert {c["url"] for c in gap} <= set(stored), "the gap was closed"
    assert all(sim.served_count(c) == 1 for c in gap), "and each call in it read once"
    assert sim.requests["group_archives"] == 3
