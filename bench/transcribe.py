"""Transcription: the embedded recogniser's speed and accuracy, dispatch throughput, and the
transcription pool's throughput with one and with two worker processes.

    python bench/transcribe.py [--rounds 5] [--pool-calls 32] [--dispatch-calls 2000]

Prints, and writes to bench/results/transcribe.txt:
  * pocketsphinx on the 16 spoken test calls (prepared 16 kHz FLAC): real-time factor (total
    processing / total audio, and the median per call), against decoding the FLAC alone as the
    baseline measured in the same run; word error rate against the calls' known text, without
    and with a custom vocabulary;
  * dispatch: calls per second through the dispatcher (mark + commit + one message per call),
    against publishing the same messages alone; and the latency of one pass of 100 with
    100,000 transcribed calls in the window against an empty window (the partial index at
    work: a pass costs what it sends, not what was transcribed before);
  * the pool: calls per second with one and with two `bcfy worker transcription` processes of
    one pool process each (production command line, real Redis and PostgreSQL), against bare
    processes doing the same recognition. Goal: two workers at least 1.6 x one.
Every part runs ROUNDS rounds with its cases interleaved (each round runs every case, the order
rotating from round to round), so drift on a shared machine hits them all alike; each figure is
printed as median (min\u2013max) over the rounds, and goals compare medians of the same run.
Uses DATABASE_URL / REDIS_URL or the local PostgreSQL / Redis when they answer (its own database,
dropped at the end, and an empty Redis database index), else throwaway servers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    heading,
    report,
    rotated,
    run_bench,
    servers,
    spread,
    start_worker,
)
from workers.audio.codec import convert_for_recognizers, decode_mono
from workers.core.rows import one_row
from workers.dev.procs import Proc, wait_until
from workers.dev.services import Servers
from workers.dev.simulator.make_clips import CLIPS_DIR

CLIPS = json.loads((CLIPS_DIR / "clips.json").read_text())["clips"]
# Unit names from the calls, as an operator would list them.
VOCABULARY = "engine twelve, medic three, unit five, ladder seven, battalion chief, engine four"


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def reset(services: Servers) -> None:
    with services.db() as conn:
        conn.execute("TRUNCATE bcfy_calls_raw, job_runs CASCADE")
    client = redis.Redis.from_url(services.redis_url)
    client.delete("transcription", "unacked", "unacked_index")
    client.close()


def add_ready_calls(services: Servers, clips: list[str], done: bool = False) -> list[int]:
    """Ready calls, one per entry of `clips` (their prepared FLAC), a second apart, in bulk."""
    with services.db() as conn:
        ids = [
            r[0]
            for r in conn.execute(
                """INSERT INTO bcfy_calls_raw (group_id, call_ts, started_at, url, raw)
                   SELECT '7001-101', extract(epoch FROM ts)::bigint, ts,
                          'https://calls.example/' || n || '-' || md5(random()::text), '{}'
                     FROM (SELECT n, now() - interval '1 hour' + n * interval '1 second' AS ts
                             FROM generate_series(1, %s) n) s
                   RETURNING id""",
                (len(clips),),
            ).fetchall()
        ]
        conn.execute(
            """UPDATE call_audio a SET state = 'ready', prepared_path = u.path, ready_at = now()
                 FROM unnest(%s::bigint[], %s::text[]) AS u(id, path)
                WHERE a.call_id = u.id""",
            (ids, [f"prepared/{Path(c).stem}.flac" for c in clips]),
        )
        if done:
            conn.execute(
                "UPDATE call_transcription SET state = 'done', due_at = NULL, finished_at = now()"
                " WHERE call_id = ANY(%s)",
                (ids,),
            )
    return ids


# --- 1. the recogniser -----------------------------------------------------------------------


def bench_recognizer(store: Path, rounds: int) -> list[str]:
    from workers.recognizers.pocketsphinx_backend import PocketsphinxRecognizer

    files = [(store / "prepared" / f"{Path(c['file']).stem}.flac", c) for c in CLIPS]
    plain = PocketsphinxRecognizer()
    tuned = PocketsphinxRecognizer(vocabulary=[t.strip() for t in VOCABULARY.split(",")])
    plain.transcribe(files[0][0], name="warm-up")
    times: dict[str, list[float]] = {c["file"]: [] for c in CLIPS}
    decode_times: dict[str, list[float]] = {c["file"]: [] for c in CLIPS}
    texts: dict[str, str] = {}
    for round_no in range(rounds):
        for path, clip in rotated(files, round_no):
            t0 = time.perf_counter()
            decode_mono(path)
            decode_times[clip["file"]].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = plain.transcribe(path, name=clip["file"])
            times[clip["file"]].append(time.perf_counter() - t0)
            texts[clip["file"]] = result.text
    tuned_texts = {c["file"]: tuned.transcribe(p, name=c["file"]).text for p, c in files}

    audio = sum(c["duration"] for c in CLIPS)
    # Per round: all calls' processing over all their audio.
    rtf = [sum(times[c["file"]][i] for c in CLIPS) / audio for i in range(rounds)]
    decode_rtf = [sum(decode_times[c["file"]][i] for c in CLIPS) / audio for i in range(rounds)]
    per_call = [
        statistics.median(times[c["file"]][i] / c["duration"] for c in CLIPS) for i in range(rounds)
    ]
    ref_words = sum(len(c["text"].split()) for c in CLIPS)

    def wer(hyps: dict[str, str]) -> float:
        errors = sum(word_errors(c["text"].split(), hyps[c["file"]].split()) for c in CLIPS)
        return errors / ref_words

    return [
        f"## pocketsphinx on the {len(CLIPS)} spoken calls ({audio:.1f} s of audio,"
        f" {ref_words} words), {rounds} rounds: median (min\u2013max)",
        f"{'real-time factor (total)':40} {spread(rtf, '.3f'):>22}",
        f"{'real-time factor (median per call)':40} {spread(per_call, '.3f'):>22}",
        f"{'baseline: FLAC decoding alone, RTF':40} {spread(decode_rtf, '.4f'):>22}",
        f"{'recognition / decoding':40}"
        f" {statistics.median(rtf) / statistics.median(decode_rtf):8.1f} x",
        f"{'word error rate':40} {wer(texts):8.1%}",
        f"{'word error rate, with vocabulary':40} {wer(tuned_texts):8.1%}"
        f"   ({len(VOCABULARY.split(','))} unit names)",
    ]


# --- 2. dispatch -------------------------------------------------------------------------------


def bench_dispatch(services: Servers, n: int, rounds: int) -> list[str]:
    from tasks.transcription.dispatch import (
        dispatch_once,
        mark_dispatched,
        pick_sql,
        publish_transcriptions,
    )
    from workers.core.runtime import Runtime
    from workers.core.settings import load_settings

    settings = load_settings(
        {**os.environ, "TRANSCRIBE_DISPATCH_BATCH": "500", "TRANSCRIBE_QUEUE_MAX": "1000000"}
    )
    rt = Runtime.current()
    client = redis.Redis.from_url(services.redis_url)

    def publish_only(ids: list[int]) -> float:
        client.delete("transcription")
        t0 = time.perf_counter()
        for start in range(0, n, 500):
            publish_transcriptions(settings, ids[start : start + 500])
        took = time.perf_counter() - t0
        assert client.llen("transcription") == n
        client.delete("transcription")
        return took

    def dispatch(ids: list[int]) -> float:
        client.delete("transcription")
        t0 = time.perf_counter()
        sent = 0
        while True:
            outcome = rt.run(dispatch_once(settings, client))
            if not outcome.sent:
                break
            sent += outcome.sent
        took = time.perf_counter() - t0
        assert sent == n == client.llen("transcription"), (sent, n)
        client.delete("transcription")
        return took

    rates: dict[str, list[float]] = {"publish": [], "dispatch": []}
    cases = [("publish", publish_only), ("dispatch", dispatch)]
    for round_no in range(rounds):  # publishing does not change the calls: either may go first
        reset(services)
        ids = add_ready_calls(services, ["call01.m4a"] * n)
        if round_no == 0:
            publish_transcriptions(settings, ids[:50])  # warm up: connection, serialiser
        for name, fn in rotated(cases, round_no):
            rates[name].append(n / fn(ids))

    def pass_latency(done: int) -> tuple[list[float], list[float]]:
        reset(services)
        if done:
            add_ready_calls(services, ["call01.m4a"] * done, done=True)
        add_ready_calls(services, ["call01.m4a"] * 100)
        with services.db() as conn:  # what autovacuum does after a bulk load
            conn.execute("VACUUM ANALYZE call_transcription, call_audio")
        walls, server = [], []
        for _ in range(9):
            t = time.perf_counter()
            assert len(rt.run(mark_dispatched(settings, 100))) == 100
            walls.append(time.perf_counter() - t)
            with services.db() as conn:
                conn.execute(
                    "UPDATE call_transcription SET state = 'pending', due_at = now()"
                    " WHERE state = 'dispatched'"
                )
                conn.execute("BEGIN")
                (plan,) = one_row(
                    conn.execute(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + pick_sql("oldest"),
                        {"max_age": 72 * 3600, "limit": 100, "lease": 900},
                    ).fetchone()
                )
                conn.execute("ROLLBACK")
            server.append(plan[0]["Execution Time"] / 1000)
        return walls, server

    walls: dict[int, list[float]] = {0: [], 100000: []}
    server: dict[int, list[float]] = {0: [], 100000: []}
    for round_no in range(rounds):  # interleaved: background work (autovacuum...) hits both
        for done in rotated(list(walls), round_no):
            w, x = pass_latency(done)
            walls[done] += w
            server[done] += x
    executing = {done: statistics.median(times) for done, times in server.items()}
    client.close()
    Runtime.shutdown_current()
    publish, dispatched = (statistics.median(rates[k]) for k in ("publish", "dispatch"))
    return [
        f"## dispatch, {n} ready calls, batches of 500; {rounds} rounds interleaved:"
        " median (min\u2013max)",
        f"{'baseline: publishing alone, calls/s':40} {spread(rates['publish'], '.0f'):>22}",
        f"{'dispatcher (mark+commit+publish), calls/s':40} {spread(rates['dispatch'], '.0f'):>22}"
        f"   ({dispatched / publish:.2f} x publishing alone)",
        *(
            f"{f'one pass of 100, {done} done in window, ms':40}"
            f" {spread((t * 1000 for t in times), '.1f'):>22}"
            f"   (query executing {spread((t * 1000 for t in server[done]), '.2f')} ms,"
            f" {executing[done] / executing[0]:.2f} x empty)"
            for done, times in walls.items()
        ),
    ]


# --- 3. the pool -------------------------------------------------------------------------------


def pool_run(services: Servers, k: int, calls: int, env: dict[str, str], logdir: Path) -> float:
    """Wall seconds for k worker processes to transcribe `calls` calls sent at once."""
    from tasks.transcription.dispatch import mark_dispatched, publish_transcriptions
    from workers.core.runtime import Runtime
    from workers.core.settings import load_settings

    reset(services)
    clips = [CLIPS[i % len(CLIPS)]["file"] for i in range(calls)]
    add_ready_calls(services, clips)
    workers: list[Proc] = []
    try:
        for i in range(k):  # `bcfy worker transcription`, one pool process each
            workers.append(start_worker("transcription", f"bench{i}", env, logdir))
        settings = load_settings({**env, "TRANSCRIBE_QUEUE_MAX": "1000000"})
        t0 = time.perf_counter()
        ids = Runtime.current().run(mark_dispatched(settings, calls))
        publish_transcriptions(settings, ids)
        with services.db() as conn:
            wait_until(
                lambda: (
                    one_row(conn.execute("SELECT count(*) FROM transcripts").fetchone())[0] >= calls
                ),
                600,
                "the pool to transcribe every call",
                every=0.05,
            )
        return time.perf_counter() - t0
    finally:
        for worker in workers:
            worker.stop(timeout=30)
        Runtime.shutdown_current()


def _decode_share(paths: list[Path]) -> None:
    from workers.recognizers.pocketsphinx_backend import PocketsphinxRecognizer

    recognizer = PocketsphinxRecognizer()
    for path in paths:
        recognizer.transcribe(path, name=path.name)


def plain_processes(store: Path, calls: int, k: int) -> float:
    """Baseline: wall seconds for k bare processes (no Celery, no database) to recognise the
    same calls, split evenly: what this machine can do in parallel right now."""
    files = [
        store / "prepared" / f"{Path(CLIPS[i % len(CLIPS)]['file']).stem}.flac"
        for i in range(calls)
    ]
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_decode_share, args=(files[i::k],)) for i in range(k)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.perf_counter() - t0


def bench_pool(services: Servers, store: Path, calls: int, rounds: int) -> list[str]:
    env = {
        **os.environ,
        "TRANSCRIPTION_CONCURRENCY": "1",
        "TRANSCRIPTION_POOL": "prefork",
        "LOG_LEVEL": "INFO",  # the worker says "ready." at INFO
    }
    logdir = Path(tempfile.mkdtemp(prefix="bcfy-bench-workers-"))
    audio = sum(CLIPS[i % len(CLIPS)]["duration"] for i in range(calls))
    walls: dict[int, list[float]] = {1: [], 2: []}
    bare: dict[int, list[float]] = {1: [], 2: []}
    cases = [(walls, k) for k in (1, 2)] + [(bare, k) for k in (1, 2)]
    try:
        for round_no in range(rounds):  # interleaved, so drift on a shared machine hits all alike
            for kind, k in rotated(cases, round_no):
                if kind is walls:
                    walls[k].append(pool_run(services, k, calls, env, logdir))
                else:
                    bare[k].append(plain_processes(store, calls, k))
            print(f"pool round {round_no + 1}/{rounds} done", flush=True)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    bare_one, bare_two = statistics.median(bare[1]), statistics.median(bare[2])
    speedup, machine = one / two, bare_one / bare_two

    def rate(ws: list[float]) -> str:
        return spread((calls / w for w in ws), ".2f")

    def paired(a: list[float], b: list[float]) -> str:
        """b's wall over a's, round by round."""
        return spread((y / x for x, y in zip(a, b, strict=True)), ".2f")

    return [
        f"## transcription pool, {calls} calls ({audio:.0f} s of audio) sent at once,"
        f" {rounds} rounds interleaved: median (min\u2013max)",
        f"{'1 worker: calls/s':40} {rate(walls[1]):>22}   ({audio / one:.1f} s of audio per s)",
        f"{'2 workers: calls/s':40} {rate(walls[2]):>22}   ({audio / two:.1f} s of audio per s)",
        f"{'baseline: 1 bare process: calls/s':40} {rate(bare[1]):>22}",
        f"{'baseline: 2 bare processes: calls/s':40} {rate(bare[2]):>22}",
        f"{'pool overhead, 1 worker vs 1 bare':40} {one / bare_one:8.2f} x"
        f"   (per round {paired(bare[1], walls[1])})",
        f"{'this machine now, 2 vs 1 bare processes':40} {machine:8.2f} x"
        f"   (per round {paired(bare[2], bare[1])})",
        f"goal: 2 workers >= 1.6 x 1 worker -> {'met' if speedup >= 1.6 else 'NOT met'}"
        f" ({speedup:.2f} x, ratio of the medians; per round {paired(walls[2], walls[1])};"
        f" {speedup / machine:.0%} of what the machine gave bare processes)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-calls", type=int, default=32)
    ap.add_argument("--dispatch-calls", type=int, default=2000)
    ap.add_argument("--redis-url", help="default: REDIS_URL, else the standard local port")
    ap.add_argument("--database-url", help="default: DATABASE_URL, else the standard local port")
    ap.add_argument("--skip-pool", action="store_true", help="no worker processes")
    args = ap.parse_args()

    store = Path(tempfile.mkdtemp(prefix="bcfy-bench-audio-"))
    try:
        with servers(args.redis_url, args.database_url) as services:
            (store / "prepared").mkdir()
            for clip in CLIPS:
                convert_for_recognizers(
                    CLIPS_DIR / clip["file"],
                    store / "prepared" / f"{Path(clip['file']).stem}.flac",
                )
            # Everything below, in this process and in the workers, uses these.
            os.environ.update(services.worker_env(store, AUDIO_STORE_DIR=str(store)))
            load = os.getloadavg()
            lines = [
                heading(
                    "transcribe",
                    f"cpus={os.cpu_count()}  load at start {load[0]:.1f} {load[1]:.1f}"
                    f" {load[2]:.1f}",
                ),
                *bench_recognizer(store, args.rounds),
                *bench_dispatch(services, args.dispatch_calls, args.rounds),
            ]
            if not args.skip_pool:
                lines += bench_pool(services, store, args.pool_calls, args.rounds)
            load = os.getloadavg()
            lines.append(f"load at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    finally:
        shutil.rmtree(store, ignore_errors=True)
    report("transcribe", lines)


if __name__ == "__main__":
    run_bench(main)
