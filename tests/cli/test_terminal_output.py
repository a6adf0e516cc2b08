"""Text from outside reaches the operator's terminal shown, never obeyed.

terminal_safe: any text in, nothing a terminal would act on out, ordinary text unchanged. And
the commands that print names, descriptions, transcripts and stored errors (`bcfy search`,
`status`, `playlists`, `audio status`, `bcfy run`'s transcript lines) print hostile ones
escaped, while the database keeps them exactly as received.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid as uuid_mod
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Services
from workers.core.rows import one_row
from workers.core.text import terminal_safe
from workers.dev.procs import run_cli

# C0, DEL, C1; bidi embeddings, overrides, isolates and marks; the line/paragraph separators.
FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)
# Letters, marks (accents), numbers, punctuation, symbols and spaces: what names are made of.
ORDINARY = st.characters(categories=["L", "M", "N", "P", "S", "Zs"])


# Any code point, lone surrogates included (JSON's "\\ud800" decodes to one).
ANY_TEXT = st.text(st.characters(exclude_categories=()))


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT)
def test_nothing_a_terminal_acts_on_comes_out(text):
    out = terminal_safe(text)
    assert not FORBIDDEN.search(out)
    assert all(unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Zl", "Zp"} for c in out)
    assert "\n" not in out and "\x1b" not in out
    out.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogate left


@settings(max_examples=300, deadline=None)
@given(st.text(ORDINARY))
def test_ordinary_text_passes_unchanged(text):
    assert terminal_safe(text) == text


@settings(max_examples=300, deadline=None)
@given(st.text(ORDINARY), st.text(ORDINARY), st.characters(categories=["Cc", "Cf", "Zl", "Zp"]))
def test_an_unsafe_character_is_replaced_by_a_visible_escape_and_nothing_else_changes(a, b, c):
    out = terminal_safe(a + c + b)
    shown = out[len(a) : len(out) - len(b)]
    assert out.startswith(a) and out.endswith(b)
    assert re.fullmatch(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})", shown)
    assert int(shown[2:], 16) == ord(c)


def test_escape_sequences_and_bidi_overrides_are_shown_not_obeyed():
    assert terminal_safe("\x1b]0;pwned\x07Fire") == "\\x1b]0;pwned\\x07Fire"
    assert terminal_safe("\x1b[2J\x9b31m") == "\\x1b[2J\\x9b31m"
    assert terminal_safe("evil\u202egnp.exe") == "evil\\u202egnp.exe"
    assert terminal_safe("line\nfake line\r") == "line\\x0afake line\\x0d"
    assert terminal_safe("Café Zürich 消防 — ½") == "Café Zürich 消防 — ½"
    assert terminal_safe(None) == ""


# --- the commands ---------------------------------------------------------------------------

# A window title (OSC), clear screen (CSI), a C1 CSI, a bidi override, a carriage return and
# a newline that would fake a line of output.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eerif\r\nFAKE LINE"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eerif\\x0d\\x0aFAKE LINE"
FIRST_LINE_SHOWN = SHOWN.split("\\x0a")[0]  # what a one-line summary of an error shows
PLAYLIST = uuid_mod.UUID("0badc0de-0000-4000-8000-000000000001")


def assert_safe(out: str) -> None:
    bad = FORBIDDEN.search(out.replace("\n", ""))  # the command's own line breaks are fine
    assert bad is None, f"{bad.group()!r} printed raw in:\n{out!r}"
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines()), out


def stored(services: Services, query: str) -> list[tuple]:
    with services.db() as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def hostile(clean: Services) -> Services:
    """A playlist, calls, a transcript and failures whose text came from outside, hostile."""
    now = datetime.now(UTC)
    with clean.db() as conn:
        conn.execute("TRUNCATE bcfy_calls_raw, bcfy_playlists, bcfy_playlist_poll_log CASCADE")
        conn.execute(
            "INSERT INTO bcfy_playlists (uuid, name, descr) VALUES (%s, %s, %s)",
            (PLAYLIST, "County " + HOSTILE, HOSTILE),
        )
        conn.execute(
            "INSERT INTO bcfy_playlist_poll_log (playlist_uuid, poll_started_at, success, error)"
            " VALUES (%s, %s, false, %s)",
            (PLAYLIST, now - timedelta(seconds=30), "service said " + HOSTILE),
        )
        ids = []
        for n in range(3):
            started = now - timedelta(minutes=5 + n)
            (call_id,) = one_row(
                conn.execute(
                    """INSERT INTO bcfy_calls_raw (playlist_uuid, group_id, call_ts, started_at,
                                                   url, descr, display, grouping, raw)
                       VALUES (%s, %s, %s, %s, 'https://calls.example/a.m4a', %s, %s, %s, '{}')
                       RETURNING id""",
                    (
                        PLAYLIST,
                        "7001-" + HOSTILE,
                        int(started.timestamp()),
                        started,
                        HOSTILE,
                        "Dispatch " + HOSTILE,
                        HOSTILE,
                    ),
                ).fetchone()
            )
            ids.append(call_id)
        conn.execute(
            "INSERT INTO transcripts (call_id, text, backend, model)"
            " VALUES (%s, %s, 'pocketsphinx', 'test')",
            (ids[0], f"structure fire {HOSTILE} on \x02oak\x03 avenue"),
        )
        conn.execute(
            "UPDATE call_audio SET state = 'failed', error_code = %s, last_error = %s,"
            " updated_at = now() WHERE call_id = %s",
            ("http_" + HOSTILE, "GET answered " + HOSTILE, ids[1]),
        )
        conn.execute(
            "UPDATE call_audio SET state = 'failed', last_error = %s, updated_at = now()"
            " WHERE call_id = %s",
            ("decoder said " + HOSTILE, ids[2]),
        )
        conn.execute(
            "UPDATE call_audio SET state = 'ready', prepared_path = 'p.flac', ready_at = now()"
            " WHERE call_id = %s",
            (ids[0],),
        )
        conn.execute(
            "UPDATE call_transcription SET state = 'failed', last_error = %s, due_at = NULL,"
            " finished_at = now() WHERE call_id = %s",
            ("backend answered " + HOSTILE, ids[0]),
        )
    return clean


def cli(services: Services, *args: str) -> str:
    env = {"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    out = run_cli(*args, env=env)
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout + out.stderr


def assert_kept_raw(services: Services) -> None:
    assert stored(services, "SELECT name, descr FROM bcfy_playlists") == [
        ("County " + HOSTILE, HOSTILE)
    ]
    assert {r[0] for r in stored(services, "SELECT display FROM bcfy_calls_raw")} == {
        "Dispatch " + HOSTILE
    }
    assert stored(services, "SELECT error FROM bcfy_playlist_poll_log") == [
        ("service said " + HOSTILE,)
    ]


def test_search_shows_hostile_talkgroups_and_transcripts_escaped(hostile):
    out = cli(hostile, "search", "structure fire")
    assert_safe(out)
    assert f"Dispatch {SHOWN}" in out and f"County {SHOWN}" in out
    # The matches are still marked; the text's own \x02 and \x03 are not taken for marks.
    assert "[structure] [fire]" in out and "oak" in out and "[oak]" not in out
    assert "1 call, newest first" in out
    as_json = cli(hostile, "search", "structure fire", "--json")
    assert_safe(as_json)
    assert json.loads(as_json)[0]["talkgroup"] == "Dispatch " + HOSTILE  # the text, as stored
    assert_kept_raw(hostile)


def test_status_shows_hostile_names_and_stored_errors_escaped(hostile):
    out = cli(hostile, "status")
    assert_safe(out)
    assert f"County {SHOWN}" in out and f"FAILED: service said {SHOWN}" in out
    # Top failures: the first line of each error.
    for text in ("service said ", "decoder said ", "http_", "backend answered "):
        assert text + FIRST_LINE_SHOWN in out
    as_json = cli(hostile, "status", "--json")
    assert_safe(as_json)
    assert json.loads(as_json)["playlists"][0]["name"] == "County " + HOSTILE
    assert_kept_raw(hostile)


def test_playlists_list_shows_hostile_names_and_errors_escaped(hostile):
    out = cli(hostile, "playlists", "list")
    assert_safe(out)
    assert "County \\x1b]0;pwned" in out and "FAILED: service said \\x1b]0;pwned" in out
    assert_kept_raw(hostile)


def test_audio_status_shows_stored_codes_escaped(hostile):
    out = cli(hostile, "audio", "status")
    assert_safe(out)
    assert f"http_{SHOWN}"[:30] in out
    assert stored(hostile, "SELECT error_code FROM call_audio WHERE error_code IS NOT NULL") == [
        ("http_" + HOSTILE,)
    ]


def test_run_prints_new_transcripts_escaped(hostile):
    from workers.cli.run import Supervisor
    from workers.core.settings import load_settings

    sup = Supervisor(load_settings())
    with psycopg.connect(hostile.database_url) as conn:
        lines = sup.new_transcripts(conn)
    assert len(lines) == 1
    assert_safe("\n".join(lines))
    assert f"County {SHOWN} / 7001-{SHOWN}: structure fire {SHOWN}" in lines[0]


def test_playlists_add_shows_a_hostile_name_from_the_service_escaped(ingest):
    env = {
        **{k: v for k, v in ingest.sim.pipeline_env().items() if k.startswith("BCFY_")},
        "DATABASE_URL": ingest.services.database_url,
        "REDIS_URL": ingest.services.redis_url,
    }
    uuid = ingest.sim.add_playlist(name="Fire " + HOSTILE, descr=HOSTILE)
    out = run_cli("playlists", "add", uuid, env=env)
    assert out.returncode == 0, out.stderr
    assert_safe(out.stdout + out.stderr)
    assert f"following {uuid}: Fire {SHOWN}" in out.stdout
    assert ingest.sql("SELECT name, descr FROM bcfy_playlists") == [("Fire " + HOSTILE, HOSTILE)]
