"""Hosts that share nothing but the network: beat, the ingest pool, two audio hosts and two
transcription hosts, each a network namespace of its own (workers.dev.hosts) with its own
address, hostname and directories, reaching PostgreSQL, Redis, the S3 server and the feed
simulator over the bridge. Audio lives only in the object store.

Under steady traffic, one audio host and then one transcription host are cut off (link down)
while they hold work, then killed. The others take the work over once its leases and claims
run out: every call is still stored, prepared and transcribed exactly once, and the attempt
rows and claims name which host held what. Nothing here bounds time: each step waits for its
event (the takeover delays are printed, not asserted; bench/hosts.py measures speed).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from workers.core.settings import SettingsError, load_settings
from workers.dev.calls import slow_audio
from workers.dev.hosts import HostNetwork, why_no_hosts
from workers.dev.pipeline import Pipeline
from workers.dev.procs import wait_until
from workers.dev.services import Servers, s3_server, scratch_servers

pytestmark = pytest.mark.slow

LAYOUT = {
    "beat": ["beat"],
    "ingest": ["ingest", "notify"],
    "audio-1": ["audio"],
    "audio-2": ["audio"],
    "transcription-1": ["transcription"],
    "transcription-2": ["transcription"],
}
PLAYLISTS = 2
RATE = 0.5  # calls per second over both playlists
TRAFFIC_SEC = 90

# Short leases and claims, so the takeover comes within the test; one process per pool.
SETTINGS = {
    "INGEST_INTERVAL_SEC": "6",
    "INGEST_CONCURRENCY": "1",
    "AUDIO_CONCURRENCY": "1",
    "AUDIO_LEASE_SEC": "6",
    "TRANSCRIPTION_CONCURRENCY": "1",
    "TRANSCRIBE_WHISPER_THREADS": "1",
    "TRANSCRIBE_SOFT_TIME_LIMIT_SEC": "15",
    "TRANSCRIBE_TIME_LIMIT_SEC": "20",  # a claim: this + 10 s
    "TRANSCRIBE_DISPATCH_LEASE_SEC": "30",  # a message sent to a host that died unread
    "LOCK_TTL_SEC": "6",  # a singleton job's lock held by a host cut off
    "LOCK_RENEW_SEC": "2",
    "NOTIFY_CONCURRENCY": "1",
}
IDENTITY = re.compile(r"^(?P<name>[a-z]+)@(?P<host>[a-z0-9-]+):\d+$")


@pytest.fixture
def network(tmp_path: Path) -> Iterator[HostNetwork]:
    reason = why_no_hosts()
    if reason is not None:
        pytest.skip(f"test hosts cannot be made here: {reason}")
    with HostNetwork(list(LAYOUT), tmp_path) as net:
        yield net


@pytest.fixture
def servers(network: HostNetwork) -> Iterator[Servers]:
    """PostgreSQL and Redis of their own, listening on the bridge (the session's listen on
    loopback, which a host cannot reach)."""
    with scratch_servers(
        "bcfy_hosts",
        "bcfy:test-hosts",
        reuse=False,
        host=network.bridge_address,
        clients=str(network.network),
    ) as found:
        yield found


@pytest.fixture
def object_store(network: HostNetwork) -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server on the bridge; the AUDIO_STORE_URL / AUDIO_S3_* settings of it."""
    with s3_server(host=network.bridge_address, reuse=False) as s3:
        env = s3.env("hosts-test")
        try:
            load_settings(env).value("AUDIO_STORE_URL")
        except (KeyError, SettingsError) as exc:
            pytest.skip(f"S3 store not available: {exc}")
        yield env


def held_audio(db: psycopg.Connection, host: str) -> dict[int, str]:
    """Calls whose download `host` is working on under a live lease: call id -> lease owner."""
    rows = db.execute(
        """SELECT a.call_id, a.lease_owner FROM call_audio a
             JOIN call_audio_attempts x
               ON x.call_id = a.call_id AND x.lease_owner = a.lease_owner AND x.ended_at IS NULL
            WHERE a.state = 'downloading' AND a.lease_until > now() AND x.worker LIKE %s""",
        (f"audio@{host}:%",),
    ).fetchall()
    return dict(rows)


def lease_ends(db: psycopg.Connection, leases: dict[int, str]) -> dict[int, datetime]:
    """When these leases (call id -> owner) run out, those still held by their owner."""
    rows = db.execute(
        """SELECT a.call_id, a.lease_until
             FROM call_audio a JOIN unnest(%s::bigint[], %s::text[]) AS l(id, owner)
               ON a.call_id = l.id AND a.lease_owner = l.owner
            WHERE a.state = 'downloading'""",
        (list(leases), list(leases.values())),
    ).fetchall()
    return dict(rows)


def db_now(db: psycopg.Connection) -> datetime:
    row = db.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def transcribed(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM call_transcription WHERE state = 'done'").fetchone()
    return int(row[0]) if row else 0


def claimed_transcriptions(db: psycopg.Connection, host: str) -> dict[int, datetime]:
    """Calls `host` is transcribing under a live claim: call id -> when the claim runs out."""
    rows = db.execute(
        """SELECT call_id, due_at FROM call_transcription
            WHERE state = 'running' AND due_at > now() AND claimed_by LIKE %s""",
        (f"transcription@{host}:%",),
    ).fetchall()
    return dict(rows)


def test_hosts_take_over_the_work_of_hosts_cut_off(
    network: HostNetwork, servers: Servers, object_store: dict[str, str], tmp_path: Path
) -> None:
    env = {**SETTINGS, **object_store}
    with (
        Pipeline(
            servers.database_url,
            servers.redis_url,
            tmp_path,
            seed=13,
            extra_env=env,
            network=network,
        ) as p,
        p.db() as db,
    ):
        p.follow_playlists(PLAYLISTS)
        p.start(LAYOUT)
        p.wait_for_warmup(timeout=180)
        # Each download takes a second, as from a distant audio host: a host is caught
        # holding leases.
        slow_audio(p.sim, 1.0)
        traffic = threading.Thread(target=p.run_traffic, args=(RATE, TRAFFIC_SEC), daemon=True)
        traffic.start()

        # An audio host cut off while it holds leases; killed once they have run out (the
        # last renewal it made says when: it can renew no more).
        wait_until(lambda: held_audio(db, "audio-1"), 120, "audio-1 to hold a lease", every=0.02)
        network.cut_off("audio-1")
        audio_held = held_audio(db, "audio-1")  # less any it finished before the cut
        assert audio_held, "audio-1 finished all it held in the instant of its cut"
        lease_until = lease_ends(db, audio_held)
        wait_until(lambda: db_now(db) >= max(lease_until.values()), 60, "audio-1's leases to end")
        for proc in p.procs_on("audio-1"):
            proc.kill_group()

        # A transcription host cut off while it holds a claim; killed once the other has
        # transcribed a call since.
        wait_until(
            lambda: claimed_transcriptions(db, "transcription-1"),
            120,
            "transcription-1 to hold a claim",
            every=0.02,
        )
        network.cut_off("transcription-1")
        claimed = claimed_transcriptions(db, "transcription-1")
        assert claimed, "transcription-1 finished its call in the instant of its cut"
        done_before = transcribed(db)
        wait_until(lambda: transcribed(db) > done_before, 120, "a call transcribed after the cut")
        for proc in p.procs_on("transcription-1"):
            proc.kill_group()

        traffic.join()
        drained = p.drain(timeout=900)  # a deadline for the event, not a speed bound
        p.stop_host("beat")
        exit_codes: dict[str, int | None] = {}
        for host in ("ingest", "audio-2", "transcription-2"):  # the hosts still connected
            exit_codes |= p.stop_host(host)
        calls = p.calls()
        sim_stats = p.sim.stats(per_call=True)
        published = dict(p.published)
        attempts = db.execute(
            """SELECT call_id, worker, outcome, started_at FROM call_audio_attempts
                ORDER BY call_id, started_at"""
        ).fetchall()
        transcriptions = {
            call_id: (claimed_by, claimed_at, n)
            for call_id, claimed_by, claimed_at, n in db.execute(
                "SELECT call_id, claimed_by, claimed_at, attempts FROM call_transcription"
            ).fetchall()
        }
        runs = db.execute("SELECT job, worker, outcome FROM job_runs").fetchall()
        prepared_paths = [path for (path,) in db.execute("SELECT prepared_path FROM call_audio")]
        logs = {name: text for name, text in p.logs() if name in exit_codes}

    # Every call published was served once, stored once, prepared once (one attempt ended
    # ready) and transcribed once.
    assert set(sim_stats["served"]) == set(published)
    assert {url: n for url, n in sim_stats["served"].items() if n != 1} == {}
    stored = Counter(c.url for c in calls)
    assert {url: n for url, n in stored.items() if n != 1} == {}, "a call stored twice"
    assert set(stored) == set(published), "a served call is missing"
    assert [c.id for c in calls if c.audio_state != "ready" or c.audio_ready_count != 1] == []
    assert [c.id for c in calls if c.transcription_state != "done" or c.transcripts != 1] == []

    # The work of the hosts cut off was taken over by the others once its leases and claims
    # had run out, never before: audio-2 prepared what audio-1 held (whose attempt never
    # ended) ...
    tried: dict[int, list[tuple[str, str | None, datetime]]] = {}
    for call_id, worker, outcome, started_at in attempts:
        tried.setdefault(call_id, []).append((host_of(worker), outcome, started_at))
    audio_takeover = {}
    for call_id, until in lease_until.items():
        unfinished = {o for h, o, _ in tried[call_id] if h == "audio-1"}
        assert unfinished and unfinished <= {None, "lease_lost", "worker_lost"}, tried[call_id]
        [(host, started_at)] = [(h, t) for h, o, t in tried[call_id] if o == "ready"]
        assert host == "audio-2" and started_at >= until, tried[call_id]
        audio_takeover[call_id] = (started_at - until).total_seconds()
    # ... and transcription-2 transcribed what transcription-1 had claimed, on a second
    # attempt.
    transcription_takeover = {}
    for call_id, due_at in claimed.items():
        claimed_by, claimed_at, n = transcriptions[call_id]
        assert (host_of(claimed_by), n) == ("transcription-2", 2), transcriptions[call_id]
        assert claimed_at >= due_at, transcriptions[call_id]
        transcription_takeover[call_id] = (claimed_at - due_at).total_seconds()
    print(
        f"\n{len(published)} calls, drained {drained:.1f} s after the traffic; taken over"
        f" (s after the lease or claim ran out): audio {audio_takeover},"
        f" transcription {transcription_takeover}"
    )

    # Every claim, attempt and run names its holder: the pool and the host it ran on.
    assert {host_of(w) for _, w, _, _ in attempts} == {"audio-1", "audio-2"}
    assert {host_of(w) for w, _, _ in transcriptions.values()} == {
        "transcription-1",
        "transcription-2",
    }
    assert {host_of(w) for _, w, _ in runs} <= {"ingest", "audio-1", "audio-2"}
    # No job failed on a host still connected.
    assert [r for r in runs if r[2] == "error" and host_of(r[1]) in ("ingest", "audio-2")] == []

    # Audio only in the object store: no host has an audio file of its own, and the hosts
    # still up left no work in progress in their own directories.
    assert all(path and not path.startswith("/") for path in prepared_paths), prepared_paths
    for h in network.hosts.values():
        assert [f for f in (h.root / "audio").rglob("*") if f.is_file()] == [], h.name
        if h.name not in ("audio-1", "transcription-1"):
            assert [f for f in (h.root / "work").rglob("*") if f.is_file()] == [], h.name
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
    assert exit_codes == dict.fromkeys(exit_codes, 0), exit_codes


def host_of(identity: str) -> str:
    """The host a worker identity `<name>@<host>:<pid>` names."""
    match = IDENTITY.fullmatch(identity)
    assert match is not None, f"{identity!r} is not a worker identity <name>@<host>:<pid>"
    return match["host"]
