"""`bcfy search` uses the full-text index: EXPLAIN of the very query it runs (workers.cli.search's
SEARCH_SQL, with the parameters it passes) over a table large enough that reading it whole
would cost the planner more, with the planner's own choices (no enable_* switched off)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.conftest import Services
from workers.cli.search import SEARCH_SQL, search_transcripts

TRANSCRIPTS = 20_000
MATCHING = 12  # calls that mention a structure fire; the rest are routine traffic

pytestmark = pytest.mark.slow


@pytest.fixture
def many_transcripts(clean: Services) -> Iterator[psycopg.Connection[TupleRow]]:
    with clean.db() as conn:
        conn.execute("TRUNCATE bcfy_calls_raw, bcfy_playlists CASCADE")
        conn.execute(
            """INSERT INTO bcfy_calls_raw (group_id, call_ts, started_at, url, raw)
               SELECT '7001-' || (i %% 50), 1700000000 + i,
                      now() - make_interval(secs => i * 7), 'https://calls.example/' || i, '{}'
                 FROM generate_series(1, %s) i""",
            (TRANSCRIPTS,),
        )
        words = [
            "unit",
            "copy",
            "en route",
            "traffic stop",
            "plate",
            "clear",
            "ten four",
            "medic",
            "north",
            "south",
            "avenue",
            "dispatch",
            "standby",
            "suspect",
            "vehicle",
        ]
        conn.execute(
            """INSERT INTO transcripts (call_id, text, backend, model)
               SELECT id,
                      CASE WHEN id %% (%(n)s / %(m)s) = 0
                           THEN 'engine twelve respond to a structure fire on oak'
                           ELSE (%(w)s::text[])[1 + id %% 15]
                                || ' ' || (%(w)s::text[])[1 + (id / 15) %% 15]
                                || ' ' || (%(w)s::text[])[1 + (id / 225) %% 15] || ' ' || id
                      END,
                      'pocketsphinx', 'test'
                 FROM bcfy_calls_raw""",
            {"n": TRANSCRIPTS, "m": MATCHING, "w": words},
        )
        # As autovacuum would: statistics, and the GIN index's pending list (rows inserted since
        # it was built, which a scan reads whole) merged into the index.
        conn.execute("VACUUM ANALYZE bcfy_calls_raw, transcripts, call_audio, bcfy_playlists")
        yield conn


def explain(conn: psycopg.Connection[TupleRow], **params: Any) -> str:
    """The plan of the query `bcfy search` runs, with the parameters it passes."""
    args = {"playlist": None, "group": None, "since": None, "limit": 20} | params
    return "\n".join(r[0] for r in conn.execute("EXPLAIN " + SEARCH_SQL, args).fetchall())


def test_search_query_uses_the_full_text_index(many_transcripts):
    conn = many_transcripts
    (seqscan,) = conn.execute("SHOW enable_seqscan").fetchone()
    assert seqscan == "on", "the planner chooses freely"
    hits = search_transcripts(conn, "structure fire")
    assert len(hits) == MATCHING, "the query finds what the table holds"

    plan = explain(conn, query="structure fire")
    assert "transcripts_search" in plan, plan
    assert "Seq Scan on transcripts" not in plan, plan
    # With the filters too (a talkgroup, an age).
    plan = explain(conn, query="structure fire", group="7001-3", since="2020-01-01")
    assert "transcripts_search" in plan, plan
