"""Pools on separate hosts with the object store: two audio hosts against one, two transcription
hosts against one.

    python bench/hosts.py [--rounds 5] [--audio-calls 300] [--transcription-calls 30]
                          [--latency 0.2] [--pin]

The hosts are network namespaces (workers.dev.hosts): ingest (which runs the dispatcher),
audio-1, audio-2, transcription-1, transcription-2, each with its own address, hostname and
directories, reaching PostgreSQL, Redis, a SeaweedFS S3 server and the feed simulator on the
bridge; audio goes only to the object store. Each host runs one pool process (AUDIO_CONCURRENCY
and TRANSCRIPTION_CONCURRENCY 1, Whisper on one thread): a one-core host, since the machine has
two cores for everything.

Each configuration works off a backlog: calls published on the simulator and stored as ingest
stores them (audio's backlog; the simulator answers each audio request LATENCY late, as a
distant audio host), or those calls prepared by both audio hosts and sent to the transcription
queue (transcription's backlog). Its workers start on 1 or 2 hosts, and it is timed from the
database's completion times (call_audio.ready_at, call_transcription.finished_at): calls per
second after every host has finished its first call (start-up and a pool process's first call,
which loads the recogniser, left out), and, for reference, from the moment the workers were
ready. Rounds are the outer loop, the four configurations in rotating order in each; figures
are medians over rounds with their range, ratios both of the medians and round by round.

CPU seconds per call of the workers and of each server (PostgreSQL, Redis, SeaweedFS, and this
process, which runs the simulator) are measured meanwhile from /proc, with the machine's busy
cores: what limits the ratio on a two-core machine. With --pin each audio and transcription host
is kept to a CPU of its own (the first of each pool on CPU 0, the second on CPU 1), as separate
machines would be; its figures go to bench/results/hosts_pinned.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, report, rotated, run_bench, spread
from workers.core.settings import SettingsError, load_settings
from workers.dev.calls import publish, slow_audio
from workers.dev.hosts import HostNetwork, why_no_hosts
from workers.dev.pipeline import Pipeline, machine_cpu
from workers.dev.procs import CLK_TCK, group_cpu_sec, wait_until
from workers.dev.services import S3Service, Servers, s3_server, scratch_servers

AUDIO_HOSTS = ("audio-1", "audio-2")
TRANSCRIPTION_HOSTS = ("transcription-1", "transcription-2")
HOSTS = ("ingest", *AUDIO_HOSTS, *TRANSCRIPTION_HOSTS)
CLAIM_JOB = "tasks.audio.process_pending_audio"
# --pin: the first host of each pool on CPU 0, the second on CPU 1 (the servers and ingest on
# either): one-core hosts, as machines of their own would be.
PINNED = {"audio-1": "0", "transcription-1": "0", "audio-2": "1", "transcription-2": "1"}
SETTINGS = {
    "INGEST_CONCURRENCY": "1",
    "AUDIO_CONCURRENCY": "1",
    "TRANSCRIPTION_CONCURRENCY": "1",
    "TRANSCRIBE_WHISPER_THREADS": "1",
}


@dataclass(frozen=True)
class Run:
    """One configuration's turn: calls/s (steady, and from the workers ready), CPU s/call."""

    steady: float
    from_ready: float
    worker_cpu: float
    worker_cores: float  # the workers' CPU seconds per second of the turn
    server_cpu: dict[str, float]
    busy_cores: float


# --- CPU of the servers --------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_sec(pid: int) -> float:
    """CPU seconds of a process, its children waited for, and its live children (a server's
    postmaster and backends), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields and (int(entry) == pid or int(fields[1]) == pid):  # itself, or ppid
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def find_pid(*parts: str) -> int:
    """The process whose command line holds every one of `parts`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(part in cmdline for part in parts):
            return int(entry)
    raise LookupError(f"no process with {parts} in its command line")


def server_pids(servers: Servers, s3: S3Service) -> dict[str, int]:
    def port(url: str) -> str:
        return url.rsplit(":", 1)[1].split("/")[0]

    return {
        "postgres": find_pid("postgres", f"-p {port(servers.admin_dsn)} "),
        "redis": find_pid("redis-server", f":{port(servers.redis_url)}"),
        "seaweedfs": find_pid("weed", "mini", f"-s3.port={port(s3.endpoint)}"),
    }


def servers_cpu(pids: dict[str, int]) -> dict[str, float]:
    times = os.times()
    return {
        **{name: tree_cpu_sec(pid) for name, pid in pids.items()},
        "simulator": times.user + times.system,  # this process: the simulator's threads
    }


# --- one configuration's turn --------------------------------------------------------------


def steady_rate(done: list[tuple[str, datetime]]) -> float:
    """Calls/s after every host finished its first call: (host, completion time) per call."""
    firsts: dict[str, datetime] = {}
    for host, at in sorted(done, key=lambda d: d[1]):
        firsts.setdefault(host, at)
    start = max(firsts.values())
    after = [at for _, at in done if at > start]
    if not after:
        return float("nan")
    return float(len(after) / (max(after) - start).total_seconds())


def timed(
    p: Pipeline,
    pids: dict[str, int],
    hosts: tuple[str, ...],
    role: str,
    go: Callable[[], None],
    finished: Callable[[], list[tuple[str, datetime]]],
    calls: int,
) -> Run:
    """Start `role`'s workers on `hosts`, `go`, wait until `finished` lists every call, stop
    them; the figures of the turn."""
    p.start({host: [role] for host in hosts})
    procs = [proc for host in hosts for proc in p.procs_on(host)]
    servers0, (busy0, total0) = servers_cpu(pids), machine_cpu()
    cpu0 = sum(group_cpu_sec(proc.pid) for proc in procs)
    t_ready = time.time()
    go()
    wait_until(lambda: len(finished()) >= calls, 900, f"{calls} calls through {role}", every=0.1)
    cpu = sum(group_cpu_sec(proc.pid) for proc in procs) - cpu0
    elapsed = time.time() - t_ready
    servers1, (busy1, total1) = servers_cpu(pids), machine_cpu()
    for host in hosts:
        p.stop_host(host)
    done = finished()
    last = max(at for _, at in done).timestamp()
    return Run(
        steady=steady_rate(done),
        from_ready=calls / (last - t_ready),
        worker_cpu=cpu / calls,
        worker_cores=cpu / elapsed,
        server_cpu={k: (servers1[k] - servers0[k]) / calls for k in servers0},
        busy_cores=(busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1),
    )


def publish_backlog(p: Pipeline, db: psycopg.Connection, calls: int) -> list[int]:
    return [publish(p.sim, db, p.playlists[i % len(p.playlists)])[0] for i in range(calls)]


def audio_ready(db: psycopg.Connection, ids: list[int]) -> list[tuple[str, datetime]]:
    return [
        (worker.split("@")[1].rsplit(":", 1)[0], at)
        for worker, at in db.execute(
            """SELECT x.worker, a.ready_at FROM call_audio a
                 JOIN call_audio_attempts x ON x.call_id = a.call_id AND x.outcome = 'ready'
                WHERE a.call_id = ANY(%s) AND a.state = 'ready'""",
            (ids,),
        ).fetchall()
    ]


def transcribed(db: psycopg.Connection, ids: list[int]) -> list[tuple[str, datetime]]:
    return [
        (claimed_by.split("@")[1].rsplit(":", 1)[0], at)
        for claimed_by, at in db.execute(
            """SELECT claimed_by, finished_at FROM call_transcription
                WHERE call_id = ANY(%s) AND state = 'done'""",
            (ids,),
        ).fetchall()
    ]


def audio_turn(
    p: Pipeline, db: psycopg.Connection, broker: redis.Redis, pids: dict[str, int], n: int, k: int
) -> Run:
    ids = publish_backlog(p, db, n)
    run = timed(
        p,
        pids,
        AUDIO_HOSTS[:k],
        "audio",
        lambda: p.trigger(CLAIM_JOB),  # as ingest does when it has stored calls
        lambda: audio_ready(db, ids),
        n,
    )
    # Leave no transcription work behind: the calls go, and their messages.
    db.execute("DELETE FROM bcfy_calls_raw WHERE id = ANY(%s)", (ids,))
    broker.delete("transcription")
    return run


def transcription_turn(
    p: Pipeline, db: psycopg.Connection, pids: dict[str, int], n: int, k: int
) -> Run:
    ids = publish_backlog(p, db, n)
    # The backlog: prepared by both audio hosts (untimed), every call sent to the queue.
    p.start({host: ["audio"] for host in AUDIO_HOSTS})
    p.trigger(CLAIM_JOB)

    def dispatched() -> bool:
        row = db.execute(
            "SELECT count(*) FROM call_transcription WHERE call_id = ANY(%s)"
            " AND state = 'dispatched'",
            (ids,),
        ).fetchone()
        return bool(row and row[0] == n)

    wait_until(dispatched, 600, "the backlog prepared and dispatched", every=0.2)
    for host in AUDIO_HOSTS:
        p.stop_host(host)
    return timed(
        p,
        pids,
        TRANSCRIPTION_HOSTS[:k],
        "transcription",
        lambda: None,
        lambda: transcribed(db, ids),
        n,
    )


# --- the bench -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--audio-calls", type=int, default=300)
    ap.add_argument("--transcription-calls", type=int, default=30)
    ap.add_argument("--latency", type=float, default=0.2, help="s before each audio answer")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="keep each audio and transcription host to a CPU of its own (taskset)",
    )
    ap.add_argument("--no-keep", action="store_true", help="do not write bench/results")
    args = ap.parse_args()
    reason = why_no_hosts()
    if reason is not None:  # `make bench` goes on with the others
        print(f"bench/hosts.py skipped: test hosts cannot be made here: {reason}")
        return

    configs = [("audio", 1), ("audio", 2), ("transcription", 1), ("transcription", 2)]
    calls = {"audio": args.audio_calls, "transcription": args.transcription_calls}
    runs: dict[tuple[str, int], list[Run]] = {c: [] for c in configs}
    loads = []
    with (
        TemporaryDirectory(prefix="bcfy-bench-hosts-") as tmp,
        HostNetwork(HOSTS, Path(tmp), PINNED if args.pin else None) as net,
        scratch_servers(
            "bcfy_bench",
            "bcfy:bench",
            reuse=False,
            host=net.bridge_address,
            clients=str(net.network),
        ) as servers,
        s3_server(host=net.bridge_address, reuse=False) as s3,
    ):
        env = {**SETTINGS, **s3.env("bench-hosts")}
        try:
            load_settings(env).value("AUDIO_STORE_URL")
        except (KeyError, SettingsError) as exc:
            raise SystemExit(f"bench/hosts.py: S3 store not available: {exc}") from None
        with (
            Pipeline(
                servers.database_url, servers.redis_url, Path(tmp), extra_env=env, network=net
            ) as p,
            p.db() as db,
            redis.Redis.from_url(servers.redis_url) as broker,
        ):
            slow_audio(p.sim, args.latency)
            p.playlists = [p.sim.add_playlist(name=f"Bench {i + 1}") for i in range(2)]
            pids = server_pids(servers, s3)
            p.start({"ingest": ["ingest"]})  # the dispatcher
            # Warm-up, untimed: a few calls through every host.
            audio_turn(p, db, broker, pids, 4, 2)
            transcription_turn(p, db, pids, 4, 2)
            for round_no in range(args.rounds):
                for stage, k in rotated(configs, round_no):
                    n = calls[stage]
                    if stage == "audio":
                        run = audio_turn(p, db, broker, pids, n, k)
                    else:
                        run = transcription_turn(p, db, pids, n, k)
                    runs[(stage, k)].append(run)
                    print(
                        f"round {round_no + 1}/{args.rounds}  {stage:13} {k} host(s)"
                        f"  {run.steady:6.2f} calls/s  busy {run.busy_cores:.2f} cores",
                        flush=True,
                    )
                loads.append(os.getloadavg()[0])

    lines = [
        heading(
            "hosts",
            f"cpus={os.cpu_count()}  rounds={args.rounds}, configurations in rotating order:"
            " median (min\u2013max)",
        ),
        f"# backlogs: audio {args.audio_calls} calls (audio answered {args.latency:g} s late),"
        f" transcription {args.transcription_calls} calls; store: S3 (SeaweedFS on the bridge);"
        " one pool process per host, Whisper (the default recogniser) on 1 thread"
        + ("; each audio and transcription host kept to a CPU of its own" if args.pin else ""),
        f"# load average (1 min) after each round: {' '.join(f'{x:.1f}' for x in loads)}"
        " (the machine is shared with other work)",
        "",
        f"{'stage':13} {'hosts':>5} {'calls/s steady':>20} {'calls/s from ready':>20}"
        f" {'busy cores':>17} {'workers cores':>17} {'worker cpu s/call':>18}"
        "  servers cpu s/call (postgres redis seaweedfs simulator)",
    ]
    for (stage, k), rs in runs.items():
        server = {
            name: statistics.median(r.server_cpu[name] for r in rs) for name in rs[0].server_cpu
        }
        lines.append(
            f"{stage:13} {k:5d} {spread((r.steady for r in rs), '.2f'):>20}"
            f" {spread((r.from_ready for r in rs), '.2f'):>20}"
            f" {spread((r.busy_cores for r in rs), '.2f'):>17}"
            f" {spread((r.worker_cores for r in rs), '.2f'):>17}"
            f" {spread((r.worker_cpu for r in rs), '.3f'):>18}  "
            + " ".join(f"{v:.3f}" for v in server.values())
        )
    lines.append("")
    for stage in ("audio", "transcription"):
        one, two = runs[(stage, 1)], runs[(stage, 2)]
        ratio = statistics.median(r.steady for r in two) / statistics.median(r.steady for r in one)
        per_round = [b.steady / a.steady for a, b in zip(one, two, strict=True)]
        lines.append(
            f"goal: two {stage} hosts >= 1.8 x one -> {'met' if ratio >= 1.8 else 'NOT met'}"
            f" ({ratio:.2f} x; per round {spread(per_round, '.2f')})"
        )
    one_host = statistics.median(r.worker_cores for r in runs[("transcription", 1)])
    for stage in ("audio", "transcription"):
        per_cpu = [statistics.median(1 / r.worker_cpu for r in runs[(stage, k)]) for k in (1, 2)]
        lines.append(
            f"{stage}: calls per worker CPU second, one host {per_cpu[0]:.2f}, two hosts"
            f" {per_cpu[1]:.2f} ({per_cpu[1] / per_cpu[0]:.2f} x): what splitting the pool"
            " over hosts costs in work per call"
        )
    lines += [
        f"transcription is CPU-bound: one host's worker keeps {one_host:.2f} cores busy, so two"
        f" would need {2 * one_host:.2f} of this machine's {os.cpu_count()} (shared with the"
        " servers and with other work); audio waits on the network (the audio answers' latency"
        " times AUDIO_DOWNLOAD_CONCURRENCY per process), not on the CPU",
        "busy cores: the whole machine's, other work included; workers cores: the measured"
        " hosts' workers alone",
    ]
    report("hosts_pinned" if args.pin else "hosts", lines, keep=not args.no_keep)


if __name__ == "__main__":
    run_bench(main)
