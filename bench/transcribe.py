"""Transcription: the embedded recognisers side by side (accuracy, speed, memory), dispatch
throughput, and the transcription pool's throughput with one and with two worker processes.

    python bench/transcribe.py [--rounds 5] [--recognizer-rounds N] [--pool-rounds N]
                               [--pool-calls 32] [--dispatch-calls 2000]
                               [--backends pocketsphinx,whisper] [--skip-pool]

Prints, and writes to bench/results/transcribe.txt:
  * each backend (pocketsphinx; whisper, one thread: the per-process figure) on the speech sets
    of workers/dev/simulator/speech (prepared 16 kHz FLAC): dev and held-out phrases, espeak-ng
    and real speakers' voices, clean and radio-like. Word error rate per set (both texts
    normalised as Whisper's evaluations do, so "twelve" and "12" match; then word edit distance,
    jiwer), on the 16 test calls also with a custom vocabulary, and per voice on the held-out
    radio-like set; real-time factor (wall / audio), CPU seconds per call (all threads), peak
    and loaded RSS, and loading time, each backend in a fresh process per round; decoding the
    same files alone in such a process is the baseline. Goals: whisper's word error rate on the
    held-out radio-like set at most half of pocketsphinx's, its real-time factor per process no
    worse. The openai backend is left out: the only OpenAI-compatible service here is the tests'
    fake, which answers canned text, so its accuracy and speed would be the fake's;
  * dispatch: calls per second through the dispatcher (mark + commit + one message per call),
    against publishing the same messages alone; and the latency of one pass of 100 with
    100,000 transcribed calls in the window against an empty window (the partial index at
    work: a pass costs what it sends, not what was transcribed before);
  * the pool, per backend: calls per second with one and with two `bcfy worker transcription`
    processes of one pool process each (production command line, real Redis and PostgreSQL),
    against bare processes doing the same recognition. Goal: two workers at least 1.6 x one.
Every part runs its rounds with its cases interleaved (each round runs every case, the order
rotating from round to round), so drift on a shared machine hits them all alike; each figure is
printed as median (min\u2013max) over the rounds, and goals compare medians of the same run
(word error rates come from the first round: recognition is deterministic).
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
from collections.abc import Callable
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
from workers.dev.simulator.make_speech import SPEECH_DIR

SPEECH = json.loads((SPEECH_DIR / "speech.json").read_text())["clips"]
# Unit names from the calls, as an operator would list them.
VOCABULARY = "engine twelve, medic three, unit five, ladder seven, battalion chief, engine four"


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


# --- 1. the recognisers ------------------------------------------------------------------------

# The backends side by side, each as a pool process runs it: one thread (whisper's default
# gives each pool process cores / concurrency threads; one is the per-process figure that
# compares with pocketsphinx, which has only one).
BACKENDS: dict[str, dict[str, str]] = {
    "pocketsphinx": {"TRANSCRIBE_BACKEND": "pocketsphinx"},
    "whisper": {"TRANSCRIBE_BACKEND": "whisper", "TRANSCRIBE_WHISPER_THREADS": "1"},
}
BASELINE = "decoding only"  # the same process reading every file, no recogniser
# (set, voices, condition): the rows of the word error table; the goal is on the last.
GROUPS = [
    ("dev", "espeak-ng", "clean"),
    ("dev", "espeak-ng", "radio"),
    ("dev", "real", "clean"),
    ("dev", "real", "radio"),
    ("heldout", "real", "clean"),
    ("heldout", "real", "radio"),
]
GOAL_GROUP = GROUPS[-1]


def group_of(clip: dict) -> tuple[str, str, str]:
    voices = "espeak-ng" if clip["voice"] == "espeak-ng" else "real"
    return clip["set"], voices, clip["condition"]


def prepared_path(store: Path, clip_file: str) -> Path:
    return store / "prepared" / f"{Path(clip_file).stem}.flac"


def wer(pairs: list[tuple[str, str]]) -> float:
    """Word error rate over (reference, hypothesis) pairs: both normalised as Whisper's
    evaluations do (case, punctuation, numbers as digits, spellings), then words aligned."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    if not pairs:  # a set left out by --sample
        return float("nan")
    normalise = EnglishTextNormalizer()
    out: float = jiwer.wer([normalise(r) for r, _ in pairs], [normalise(h) for _, h in pairs])
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recognise_files(
    backend: str, env: dict[str, str], files: list[str], vocabulary_files: list[str]
) -> dict:
    """In a fresh process (spawned): make BACKEND's recogniser as a pool process does, then
    recognise FILES one by one. Per file: wall and CPU seconds (all threads) and the text; RSS
    after loading and at its peak; then, with the vocabulary, the texts of VOCABULARY_FILES."""
    import resource

    os.environ.update(env)
    from workers.core.settings import load_settings
    from workers.recognizers import build_recognizer

    t0 = time.perf_counter()
    recognizer = (
        build_recognizer(load_settings(os.environ).transcription) if backend != BASELINE else None
    )
    if recognizer is not None:  # a model may load on first use: this call pays for it
        recognizer.transcribe(Path(files[0]), name="warm-up")
    loaded = time.perf_counter() - t0
    rss_loaded = rss_mb()
    calls = {}
    for file in files:
        t0, c0 = time.perf_counter(), time.process_time()
        if recognizer is None:
            decode_mono(file)
            text = ""
        else:
            text = recognizer.transcribe(Path(file), name=Path(file).name).text
        calls[file] = (time.perf_counter() - t0, time.process_time() - c0, text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tuned_texts = []
    if recognizer is not None and vocabulary_files:
        settings = load_settings({**os.environ, "TRANSCRIBE_VOCABULARY": VOCABULARY})
        tuned = build_recognizer(settings.transcription)
        tuned_texts = [tuned.transcribe(Path(f), name=Path(f).name).text for f in vocabulary_files]
    return {
        "load": loaded,
        "rss_loaded": rss_loaded,
        "peak_rss": peak,
        "calls": calls,
        "tuned": tuned_texts,
    }


def in_fresh_process(fn: Callable[..., dict], *args: object) -> dict:
    """FN(*ARGS) in a spawned process: nothing loaded before, its own peak RSS."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict = pool.apply(fn, args)
        pool.close()  # a clean exit, not terminate(): nothing left for the resource tracker
        pool.join()
    return result


def bench_recognizers(
    store: Path, rounds: int, backends: list[str], speech: list[dict]
) -> tuple[list[str], list[str]]:
    """Each backend, and the decoding-only baseline, in a fresh process per round, in rotating
    order: the first round over every clip of SPEECH (the word error rates), each round over
    the held-out radio-like clips (speed and memory). Returns the report's lines and the
    backends that worked."""

    def path(clip: dict) -> str:
        return str(prepared_path(store, clip["file"]))

    timed = [c for c in speech if group_of(c) == GOAL_GROUP]
    dev_clean = [c for c in speech if group_of(c) == GROUPS[0]]
    results: dict[str, list[dict]] = {name: [] for name in [*backends, BASELINE]}
    failed: dict[str, str] = {}
    for round_no in range(rounds):
        for name in rotated(list(results), round_no):
            if name in failed:
                continue
            files = [path(c) for c in (speech if round_no == 0 else timed)]
            vocabulary_files = [path(c) for c in dev_clean] if round_no == 0 else []
            try:
                results[name].append(
                    in_fresh_process(
                        recognise_files, name, BACKENDS.get(name, {}), files, vocabulary_files
                    )
                )
            except Exception as exc:  # a backend this installation lacks: say so, go on
                failed[name] = f"{type(exc).__name__}: {exc}"
        print(f"recogniser round {round_no + 1}/{rounds} done", flush=True)
    worked = [n for n in backends if n not in failed]
    audio = sum(c["duration"] for c in speech)
    timed_audio = sum(c["duration"] for c in timed)
    words = sum(len(c["text"].split()) for c in speech)
    lines = [
        f"## recognisers, one process per backend and round, backends in rotating order;"
        f" {rounds} rounds: median (min\u2013max)",
        *(f"{name}: NOT measured ({why})" for name, why in failed.items()),
        f"# word error rate, first round: {len(speech)} clips of workers/dev/simulator/speech"
        f" ({audio:.0f} s, {words} words), texts normalised as Whisper's evaluations do",
        f"{'set, voices, condition (clips)':40}" + "".join(f" {n:>14}" for n in worked),
    ]

    def wer_of(name: str, clips: list[dict]) -> float:
        calls = results[name][0]["calls"]
        return wer([(c["text"], calls[path(c)][2]) for c in clips])

    def row(label: str, clips: list[dict]) -> str:
        return f"{f'{label} ({len(clips)})':40}" + "".join(
            f" {wer_of(n, clips):14.1%}" for n in worked
        )

    wers: dict[tuple[str, str, str], dict[str, float]] = {}
    for group in GROUPS:
        members = [c for c in speech if group_of(c) == group]
        wers[group] = {n: wer_of(n, members) for n in worked}
        lines.append(row(", ".join(group), members))
    tuned = {
        n: wer([(c["text"], t) for c, t in zip(dev_clean, results[n][0]["tuned"], strict=True)])
        for n in worked
    }
    lines.append(
        f"{'dev, espeak-ng, clean, with vocabulary':40}"
        + "".join(f" {tuned[n]:14.1%}" for n in worked)
        + f"   ({len(VOCABULARY.split(','))} unit names)"
    )
    lines.append(f"# {', '.join(GOAL_GROUP)}, by voice")
    for voice in sorted({c["voice"] for c in timed}):
        lines.append(row(voice, [c for c in timed if c["voice"] == voice]))

    def per_round(name: str, fn: Callable[[dict], float]) -> list[float]:
        return [fn(r) for r in results[name]]

    def timed_calls(r: dict) -> list[tuple[float, float, str]]:
        return [r["calls"][path(c)] for c in timed]

    lines.append(
        f"# speed and memory per process, one thread, every round: the {len(timed)}"
        f" {', '.join(GOAL_GROUP)} clips ({timed_audio:.0f} s)"
    )
    rtf: dict[str, float] = {}
    for name in [*worked, BASELINE]:
        if name in failed:
            continue
        rtfs = per_round(name, lambda r: sum(w for w, _, _ in timed_calls(r)) / timed_audio)
        rtf[name] = statistics.median(rtfs)
        cpu_call = per_round(name, lambda r: statistics.median(c for _, c, _ in timed_calls(r)))
        cpu_audio = per_round(name, lambda r: sum(c for _, c, _ in timed_calls(r)) / timed_audio)
        lines += [
            f"{name}:",
            f"{'  real-time factor (wall / audio)':40} {spread(rtfs, '.3f'):>22}",
            f"{'  CPU s per call (median call)':40} {spread(cpu_call, '.3f'):>22}",
            f"{'  CPU s per s of audio':40} {spread(cpu_audio, '.3f'):>22}",
            f"{'  peak RSS, MB':40} {spread(per_round(name, lambda r: r['peak_rss']), '.0f'):>22}",
            f"{'  RSS after loading + 1 call, MB':40}"
            f" {spread(per_round(name, lambda r: r['rss_loaded']), '.0f'):>22}",
            f"{'  making it + 1 call, s':40}"
            f" {spread(per_round(name, lambda r: r['load']), '.2f'):>22}",
        ]
    if "pocketsphinx" in worked and "whisper" in worked:
        ours, theirs = wers[GOAL_GROUP]["whisper"], wers[GOAL_GROUP]["pocketsphinx"]
        lines.append(
            f"goal: whisper's WER on {', '.join(GOAL_GROUP)} <= half of pocketsphinx's -> "
            f"{'met' if ours <= theirs / 2 else 'NOT met'} ({ours:.1%} vs {theirs:.1%},"
            f" {ours / theirs:.2f} x)"
        )
        lines.append(
            "goal: whisper's real-time factor per process <= pocketsphinx's -> "
            f"{'met' if rtf['whisper'] <= rtf['pocketsphinx'] else 'NOT met'}"
            f" ({rtf['whisper']:.3f} vs {rtf['pocketsphinx']:.3f}, medians;"
            f" {rtf['pocketsphinx'] / rtf['whisper']:.2f} x as fast)"
        )
    return lines, worked


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

# The pool's calls: the held-out radio-like clips, in turn.
POOL_CLIPS = [c for c in SPEECH if group_of(c) == GOAL_GROUP]


def pool_clips(calls: int) -> list[dict]:
    return [POOL_CLIPS[i % len(POOL_CLIPS)] for i in range(calls)]


def pool_run(services: Servers, k: int, calls: int, env: dict[str, str], logdir: Path) -> float:
    """Wall seconds for k worker processes to transcribe `calls` calls sent at once."""
    from tasks.transcription.dispatch import mark_dispatched, publish_transcriptions
    from workers.core.runtime import Runtime
    from workers.core.settings import load_settings

    reset(services)
    add_ready_calls(services, [c["file"] for c in pool_clips(calls)])
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


def _recognise_share(env: dict[str, str], paths: list[Path]) -> None:
    from workers.core.settings import load_settings
    from workers.recognizers import build_recognizer

    recognizer = build_recognizer(load_settings(env).transcription)
    for path in paths:
        recognizer.transcribe(path, name=path.name)


def plain_processes(store: Path, calls: int, k: int, env: dict[str, str]) -> float:
    """Baseline: wall seconds for k bare processes (no Celery, no database) to recognise the
    same calls, split evenly: what this machine can do in parallel right now."""
    files = [prepared_path(store, c["file"]) for c in pool_clips(calls)]
    ctx = multiprocessing.get_context("fork")  # this process never loads a model
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_recognise_share, args=(env, files[i::k])) for i in range(k)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a bare {env['TRANSCRIBE_BACKEND']} process failed")
    return time.perf_counter() - t0


def bench_pool(
    services: Servers, store: Path, calls: int, rounds: int, backends: list[str]
) -> list[str]:
    logdir = Path(tempfile.mkdtemp(prefix="bcfy-bench-workers-"))
    audio = sum(c["duration"] for c in pool_clips(calls))
    walls: dict[tuple[str, int], list[float]] = {(b, k): [] for b in backends for k in (1, 2)}
    bare: dict[tuple[str, int], list[float]] = {(b, k): [] for b in backends for k in (1, 2)}
    cases = [(kind, b, k) for b in backends for kind in ("pool", "bare") for k in (1, 2)]
    try:
        for round_no in range(rounds):  # interleaved, so drift on a shared machine hits all alike
            for kind, b, k in rotated(cases, round_no):
                env = {
                    **os.environ,
                    **BACKENDS[b],
                    "TRANSCRIPTION_CONCURRENCY": "1",
                    "TRANSCRIPTION_POOL": "prefork",
                    "LOG_LEVEL": "INFO",  # the worker says "ready." at INFO
                }
                if kind == "pool":
                    walls[b, k].append(pool_run(services, k, calls, env, logdir))
                else:
                    bare[b, k].append(plain_processes(store, calls, k, env))
            print(f"pool round {round_no + 1}/{rounds} done", flush=True)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    def rate(ws: list[float]) -> str:
        return spread((calls / w for w in ws), ".2f")

    def paired(a: list[float], b: list[float]) -> str:
        """b's wall over a's, round by round."""
        return spread((y / x for x, y in zip(a, b, strict=True)), ".2f")

    lines = [
        f"## transcription pool, {calls} held-out radio-like calls ({audio:.0f} s of audio) sent"
        f" at once, one thread per process, {rounds} rounds interleaved: median (min\u2013max)",
    ]
    for b in backends:
        one, two = statistics.median(walls[b, 1]), statistics.median(walls[b, 2])
        bare_one, bare_two = statistics.median(bare[b, 1]), statistics.median(bare[b, 2])
        speedup, machine = one / two, bare_one / bare_two
        lines += [
            f"{b}:",
            f"{'  1 worker: calls/s':40} {rate(walls[b, 1]):>22}"
            f"   ({audio / one:.1f} s of audio per s)",
            f"{'  2 workers: calls/s':40} {rate(walls[b, 2]):>22}"
            f"   ({audio / two:.1f} s of audio per s)",
            f"{'  baseline: 1 bare process: calls/s':40} {rate(bare[b, 1]):>22}",
            f"{'  baseline: 2 bare processes: calls/s':40} {rate(bare[b, 2]):>22}",
            f"{'  pool overhead, 1 worker vs 1 bare':40} {one / bare_one:8.2f} x"
            f"   (per round {paired(bare[b, 1], walls[b, 1])})",
            f"{'  this machine now, 2 vs 1 bare':40} {machine:8.2f} x"
            f"   (per round {paired(bare[b, 2], bare[b, 1])})",
            f"  goal: 2 workers >= 1.6 x 1 worker -> {'met' if speedup >= 1.6 else 'NOT met'}"
            f" ({speedup:.2f} x, ratio of the medians; per round"
            f" {paired(walls[b, 2], walls[b, 1])}; {speedup / machine:.0%} of what the machine"
            " gave bare processes)",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recognizer-rounds", type=int, help="default: --rounds")
    ap.add_argument("--pool-rounds", type=int, help="default: --rounds")
    ap.add_argument("--pool-calls", type=int, default=32)
    ap.add_argument("--dispatch-calls", type=int, default=2000)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    ap.add_argument("--redis-url", help="default: REDIS_URL, else the standard local port")
    ap.add_argument("--database-url", help="default: DATABASE_URL, else the standard local port")
    ap.add_argument("--skip-pool", action="store_true", help="no worker processes")
    ap.add_argument(
        "--sample", type=int, default=1, help="every Nth reading only: a quick look, not results"
    )
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    # Every Nth reading, both its clean and its radio-like clip (they are next to each other).
    sampled = [c for i, c in enumerate(SPEECH) if (i // 2) % args.sample == 0]
    if unknown := set(backends) - set(BACKENDS):
        ap.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")

    store = Path(tempfile.mkdtemp(prefix="bcfy-bench-audio-"))
    try:
        with servers(args.redis_url, args.database_url) as services:
            (store / "prepared").mkdir()
            for clip in SPEECH:  # the 16 test calls among them
                convert_for_recognizers(
                    SPEECH_DIR / clip["file"], prepared_path(store, clip["file"])
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
            ]

            def section(part: list[str]) -> None:
                """Print a finished part, and keep the report so far: a long run that is
                stopped keeps what it measured."""
                load = os.getloadavg()
                part = [*part, f"load now {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"]
                print("\n".join(part), flush=True)
                lines.extend(part)
                report("transcribe", lines, keep=args.sample == 1, echo=False)

            recognised, worked = bench_recognizers(
                store, args.recognizer_rounds or args.rounds, backends, sampled
            )
            section(recognised)
            section(bench_dispatch(services, args.dispatch_calls, args.rounds))
            if not args.skip_pool:
                section(
                    bench_pool(
                        services, store, args.pool_calls, args.pool_rounds or args.rounds, worked
                    )
                )
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    run_bench(main)
