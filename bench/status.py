"""`bcfy status` and a metrics scrape with a year of history: how long their PostgreSQL reads
take, before and after the maintenance job prunes (goal: under 200 ms each).

A scratch database is filled with INSERT ... SELECT generate_series at the default cadence:
job runs ~30,000 a day, the poll log 8,640 per playlist a day, calls at CALLS_PER_DAY (all
prepared and transcribed; one attempt each, a few failures), quarantined records. Then, each
timed REPEAT times on one connection, the two interleaved (shown as median (min\u2013max)):

  status   workers.cli.status._from_database(details=True): everything `bcfy status` reads from
           PostgreSQL;
  metrics  workers.cli.status._from_database(details=False) + _totals: what one scrape reads.

Phases: the year as an upgrade finds it (no maintenance run yet: the counters still count
whole tables); after a maintenance run that keeps everything (counters folded); after a
maintenance run with the default retention settings (pruned). The phases follow one another by
nature (each changes the data); within a phase, status and metrics alternate.

    python bench/status.py [--days 365] [--calls-per-day 12000] [--playlists 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import heading, interleaved_ms, report, run_bench, servers, spread

REPEAT = 15
JOB_RUNS_PER_DAY = 30_000
POLLS_PER_PLAYLIST_PER_DAY = 8_640
QUARANTINE_PER_DAY = 50
GOAL_MS = 200


def fill(conn: psycopg.Connection, days: int, calls_per_day: int, playlists: int) -> list[str]:
    """A year of history, oldest first, ending now. Returns what was made, for the report."""
    made: list[str] = []

    def run(what: str, sql: str, **params: object) -> None:
        t0 = time.monotonic()
        cur = conn.execute(sql, params)
        made.append(f"  {what:34} {cur.rowcount:>12,} rows  {time.monotonic() - t0:7.1f} s")
        print(made[-1], flush=True)

    # Rows are made directly in their final state: the stage triggers are bypassed, and the
    # full-text index is built once at the end.
    conn.execute("SET session_replication_role = replica")
    conn.execute("SET maintenance_work_mem = '512MB'")
    conn.execute("DROP INDEX transcripts_search")
    sec = 86400 * days
    run(
        "playlists",
        "INSERT INTO bcfy_playlists (uuid, name) SELECT md5('p' || i)::uuid, 'playlist ' || i"
        "  FROM generate_series(1, %(n)s) i",
        n=playlists,
    )
    jobs = (
        "ARRAY['tasks.audio.process_pending_audio', 'tasks.audio.process_pending_audio',"
        " 'tasks.ingest.poll_followed_playlists', 'tasks.transcription.dispatch_ready_calls',"
        " 'tasks.audio.process_pending_audio', 'tasks.ingest.poll_followed_playlists']"
    )
    run(
        "job_runs",
        f"INSERT INTO job_runs (job, worker, started_at, ended_at, outcome, error)"
        f" SELECT ({jobs})[1 + i %% 6], 'w1@host:1', t, t + interval '200 ms',"
        "        CASE WHEN i %% 50 = 0 THEN 'skipped' WHEN i %% 997 = 0 THEN 'error' ELSE 'ok' END,"
        "        CASE WHEN i %% 50 = 0 THEN 'already running, held by w2@host:2' END"
        "   FROM generate_series(1, %(n)s) i,"
        "        LATERAL (SELECT now() - make_interval(secs => %(sec)s * (1 - i::float8 / %(n)s)))"
        "        AS at(t)",
        n=JOB_RUNS_PER_DAY * days,
        sec=sec,
    )
    run(
        "bcfy_playlist_poll_log",
        "INSERT INTO bcfy_playlist_poll_log (playlist_uuid, poll_started_at, poll_ended_at,"
        "       mode, pos_sent, last_pos, success, calls_received, calls_new, http_status, error)"
        " SELECT md5('p' || (1 + i %% %(p)s))::uuid, t, t + interval '300 ms', 'pos', 1, 1,"
        "        i %% 500 <> 0, 3, 1, CASE WHEN i %% 500 = 0 THEN 503 ELSE 200 END,"
        "        CASE WHEN i %% 500 = 0 THEN 'HTTP 503 from the service' END"
        "   FROM generate_series(1, %(n)s) i,"
        "        LATERAL (SELECT now() - make_interval(secs => %(sec)s * (1 - i::float8 / %(n)s)))"
        "        AS at(t)",
        n=POLLS_PER_PLAYLIST_PER_DAY * playlists * days,
        p=playlists,
        sec=sec,
    )
    run(
        "bcfy_calls_raw",
        "INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at, ended_at,"
        "       duration_sec, url, size_bytes, raw, created_at)"
        " SELECT md5('p' || (1 + i %% %(p)s))::uuid, '1-' || (i %% 40),"
        "        extract(epoch FROM t)::bigint,"
        "        t, t + interval '8 s', 8, 'https://calls.broadcastify.com/x/' || i || '.m4a',"
        "        30000, jsonb_build_object('ts', extract(epoch FROM t)::bigint, 'grouping', 'PD'),"
        "        t + interval '10 s'"
        "   FROM generate_series(1, %(n)s) i,"
        "        LATERAL (SELECT now() - make_interval(secs => %(sec)s * (1 - i::float8 / %(n)s)))"
        "        AS at(t)",
        n=calls_per_day * days,
        p=playlists,
        sec=sec,
    )
    # One call in 200 fails its audio for good; the rest are ready 30 s after they were stored.
    run(
        "call_audio",
        "INSERT INTO call_audio (call_id, state, attempts, next_attempt_at, original_path,"
        "       original_bytes, prepared_path, prepared_bytes, ready_at, error_code, last_error,"
        "       updated_at)"
        " SELECT id, CASE WHEN id %% 200 = 0 THEN 'failed' ELSE 'ready' END, 1, created_at,"
        "        CASE WHEN id %% 200 <> 0 THEN playlist_uuid || '/' || id || '.m4a' END, 30000,"
        "        CASE WHEN id %% 200 <> 0 THEN playlist_uuid || '/' || id || '.16k.flac' END,"
        "        40000, CASE WHEN id %% 200 <> 0 THEN created_at + interval '30 s' END,"
        "        CASE WHEN id %% 200 = 0 THEN 'http_404' END,"
        "        CASE WHEN id %% 200 = 0 THEN 'answered 404' END, created_at + interval '30 s'"
        "   FROM bcfy_calls_raw",
    )
    run(
        "call_audio_attempts",
        "INSERT INTO call_audio_attempts (call_id, attempt, lease_owner, worker, started_at,"
        "       ended_at, outcome, bytes, download_ms, prepare_ms)"
        " SELECT call_id, 1, 'a1@host:1', 'a1@host:1', updated_at - interval '3 s', updated_at,"
        "        CASE state WHEN 'ready' THEN 'ready' ELSE 'failed' END, 30000, 400, 300"
        "   FROM call_audio",
    )
    run(
        "call_transcription",
        "INSERT INTO call_transcription (call_id, call_started_at, state, due_at, dispatched_at,"
        "       dispatch_count, attempts, finished_at, last_error, created_at, updated_at)"
        " SELECT a.call_id, c.started_at, CASE WHEN a.call_id %% 1000 = 1 THEN 'failed'"
        "        ELSE 'done' END, NULL, a.ready_at, 1, 1, a.ready_at + interval '20 s',"
        "        CASE WHEN a.call_id %% 1000 = 1 THEN 'recogniser crashed' END,"
        "        a.ready_at, a.ready_at + interval '20 s'"
        "   FROM call_audio a JOIN bcfy_calls_raw c ON c.id = a.call_id WHERE a.state = 'ready'",
    )
    run(
        "transcripts",
        "INSERT INTO transcripts (call_id, text, backend, model, confidence, processing_sec,"
        "       audio_duration_sec, created_at)"
        " SELECT call_id, 'engine ' || (call_id %% 97) || ' respond to main street and '"
        "        || (call_id %% 1013) || 'th avenue', 'pocketsphinx', 'en-us', 0.7, 6, 8,"
        "        finished_at"
        "   FROM call_transcription WHERE state = 'done'",
    )
    run(
        "bcfy_calls_quarantine",
        "INSERT INTO bcfy_calls_quarantine (playlist_uuid, polled_at, reason, raw, created_at)"
        " SELECT md5('p' || (1 + i %% %(p)s))::uuid, t, 'size: not a whole number',"
        "        jsonb_build_object('size', 'x' || i), t"
        "   FROM generate_series(1, %(n)s) i,"
        "        LATERAL (SELECT now() - make_interval(secs => %(sec)s * (1 - i::float8 / %(n)s)))"
        "        AS at(t)",
        n=QUARANTINE_PER_DAY * days,
        p=playlists,
        sec=sec,
    )
    t0 = time.monotonic()
    conn.execute("CREATE INDEX transcripts_search ON transcripts USING gin (search)")
    made.append(
        f"  {'transcripts_search (rebuilt)':34} {'':>12}       {time.monotonic() - t0:7.1f} s"
    )
    conn.execute("SET session_replication_role = origin")
    vacuum(conn)
    return made


def vacuum(conn: psycopg.Connection) -> None:
    """As autovacuum would have, over a year: statistics and visibility maps up to date."""
    t0 = time.monotonic()
    conn.execute("VACUUM (ANALYZE)")
    print(f"  vacuum analyze {time.monotonic() - t0:.1f} s", flush=True)


def measure(database_url: str, phase: str) -> list[str]:
    from workers.cli.status import Snapshot, _from_database, _totals

    lines = []
    with psycopg.connect(database_url, autocommit=True) as conn:

        def status() -> None:
            _from_database(Snapshot(generated_at=""), conn, details=True)

        def metrics() -> None:
            snap = Snapshot(generated_at="")
            _from_database(snap, conn, details=False)
            _totals(snap, conn)

        for name, ms in interleaved_ms({"status": status, "metrics": metrics}, REPEAT).items():
            verdict = "ok" if statistics.median(ms) < GOAL_MS else f"OVER {GOAL_MS} ms"
            lines.append(f"  {phase:44} {name:8} {spread(ms):>30} ms  {verdict}")
            print(lines[-1], flush=True)
    return lines


def sizes(conn: psycopg.Connection) -> str:
    rows = conn.execute(
        "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE relname = ANY(%s)"
        " ORDER BY relname",
        (
            [
                "job_runs",
                "bcfy_playlist_poll_log",
                "bcfy_calls_raw",
                "call_audio_attempts",
                "bcfy_calls_quarantine",
                "transcripts",
            ],
        ),
    ).fetchall()
    return ", ".join(f"{name} {n:,}" for name, n in rows)


def maintain(database_url: str, **overrides: object) -> tuple[float, dict[str, int], bool]:
    """One maintenance pass to completion in this process, with these settings."""
    import os

    os.environ["DATABASE_URL"] = database_url
    from tasks.maintenance.jobs import run_maintenance
    from workers.core.runtime import Runtime
    from workers.core.settings import get_settings, reset_settings_cache

    reset_settings_cache()
    Runtime.shutdown_current()
    s = get_settings().with_values(AUDIO_STORE_DIR="/nonexistent-bench-store", **overrides)
    t0 = time.monotonic()
    result = Runtime.current().run(run_maintenance(s))
    took = time.monotonic() - t0
    Runtime.shutdown_current()
    return (
        took,
        {**result.pruned, **{f"folded {k}": n for k, n in result.folded.items()}},
        (result.out_of_time),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--calls-per-day", type=int, default=12_000)
    parser.add_argument("--playlists", type=int, default=4)
    parser.add_argument("--batch", type=int, default=20_000, help="RETENTION_BATCH_SIZE")
    args = parser.parse_args()
    from workers.core.settings import env_fields

    out = [
        heading(
            "status",
            f"{args.days} days, {args.playlists} playlists, {args.calls_per_day:,} calls/day,"
            f" {JOB_RUNS_PER_DAY:,} job runs/day; {REPEAT} timed repeats each",
        ),
        "",
        "filling:",
    ]
    with servers() as srv:
        with srv.db() as conn:
            out += fill(conn, args.days, args.calls_per_day, args.playlists)
            out += [
                "",
                f"rows: {sizes(conn)}",
                "",
                "PostgreSQL reads, median (min\u2013max) (goal: median < 200 ms):",
            ]
        out += measure(srv.database_url, f"{args.days} days, before any maintenance run")

        keep = {
            f.metadata["env"]: 0.0
            for group, f in env_fields()
            if group == "retention" and f.name.endswith("_days")
        }
        took, done, _ = maintain(
            srv.database_url, RETENTION_BATCH_SIZE=args.batch, RETENTION_BATCH_PAUSE_SEC=0.0, **keep
        )
        fold_line = f"  maintenance, everything kept (counters folded): {took:.1f} s"
        print(fold_line, flush=True)
        out += measure(srv.database_url, f"{args.days} days, counters folded, nothing pruned")

        took, done, out_of_time = maintain(
            srv.database_url, RETENTION_BATCH_SIZE=args.batch, RETENTION_BATCH_PAUSE_SEC=0.0
        )
        pruned = {k: n for k, n in done.items() if not k.startswith("folded")}
        prune_line = (
            f"  maintenance, default retention, batches of {args.batch:,}: {took:.1f} s"
            f"{' (stopped at its budget)' if out_of_time else ''}; pruned "
            + ", ".join(f"{k} {n:,}" for k, n in pruned.items())
        )
        print(prune_line, flush=True)
        with srv.db() as conn:
            vacuum(conn)
            after_rows = sizes(conn)
        out += measure(srv.database_url, "after the prune (defaults)")
        out += ["", "maintenance runs:", fold_line, prune_line, f"  rows after: {after_rows}"]
    report("status", out)


if __name__ == "__main__":
    run_bench(main)
