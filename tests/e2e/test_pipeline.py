"""End to end: beat and the three worker pools as real processes, started as `bcfy beat` and
`bcfy worker` start them, with production settings, following two playlists of the feed
simulator (`bcfy playlists add`) for a minute of traffic arriving on the real clock. Then the
pipeline drains, and every call the simulator served must be stored once, prepared once and
transcribed once, each record read (billed) once, with no job failing and nothing left in
flight. Latency from publication to transcript is reported (pytest -s prints it) but not
bounded: how fast is bench/e2e.py's to measure, and a loaded machine must not fail this test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Services
from workers.dev.pipeline import Latency, Pipeline

pytestmark = pytest.mark.slow

PLAYLISTS = 2
RATE = 0.4  # calls per second over both playlists: one every 2.5 s, 12 a minute each
TRAFFIC_SEC = 60


def test_a_minute_of_traffic_is_transcribed_exactly_once(clean: Services, tmp_path: Path) -> None:
    with Pipeline(clean.database_url, clean.redis_url, tmp_path, seed=6) as p:
        p.empty()
        p.follow_playlists(PLAYLISTS)
        p.start()
        p.wait_for_warmup()
        traffic = p.run_traffic(RATE, TRAFFIC_SEC)
        drained = p.drain(timeout=600)  # a deadline for the event, not a speed bound
        p.quiesce()
        exit_codes = p.stop_processes()
        calls = p.calls()
        sim_stats = p.sim.stats(per_call=True)
        published = dict(p.published)
        latency = Latency.of([c for c in calls if c.url not in p.warmup], published)
        runs = p.job_runs()
        errors = p.job_errors()
        logs = dict(p.logs())

    report = "\n".join(
        [
            f"{len(published)} calls published ({len(traffic.offsets)} in {TRAFFIC_SEC} s of"
            f" traffic at {RATE:g}/s, {PLAYLISTS} warm-up), drained {drained:.1f} s after",
            latency.summary(),
            "job runs: "
            + ", ".join(f"{j.rsplit('.', 1)[1]} {o} {n}" for (j, o), n in runs.items()),
        ]
    )
    print("\n" + report)

    # Every call published was served, and each record read (billed) exactly once.
    served = sim_stats["served"]
    assert set(served) == set(published)
    assert len(traffic.offsets) >= 15, report
    assert {url: n for url, n in served.items() if n != 1} == {}, "a call read other than once"
    # Every call served is stored exactly once.
    stored = Counter(c.url for c in calls)
    assert {url: n for url, n in stored.items() if n != 1} == {}, "a call stored twice"
    assert set(stored) == set(published), "a served call is missing"
    assert sim_stats["billed_records"] / len(calls) == 1.0
    # ... prepared exactly once, each audio file downloaded once ...
    assert [c for c in calls if c.audio_state != "ready" or c.audio_ready_count != 1] == []
    assert sim_stats["audio_requests"] == len(calls)
    # ... and transcribed exactly once, on its first attempt.
    assert [c for c in calls if c.transcription_state != "done" or c.transcripts != 1] == []
    assert [c for c in calls if (c.transcription_attempts, c.dispatch_count) != (1, 1)] == []
    # No job failed or lost its lock; every job ran (skips are allowed: a tick can meet a
    # run triggered by the stage before).
    assert errors == [], errors
    assert {job for job, _ in runs} >= {
        "tasks.ingest.poll_followed_playlists",
        "tasks.audio.process_pending_audio",
        "tasks.transcription.dispatch_ready_calls",
    }
    for name, text in logs.items():
        assert "Traceback" not in text and "ERROR/" not in text, f"{name}:\n{text[-3000:]}"
    # Everything stopped cleanly (warm shutdown), with nothing left in flight (quiesce waited
    # for empty queues and no unacknowledged message).
    assert exit_codes == dict.fromkeys(exit_codes, 0), exit_codes

    # Every call of the traffic reached a transcript (how fast is bench/e2e.py's question).
    assert latency.calls == len(traffic.offsets), report
