"""`bcfy search` over transcripts in PostgreSQL: full-text, newest first, filters, snippets."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from workers.cli.main import main
from workers.cli.search import parse_since

FIRE = uuid.UUID("11111111-2222-3333-4444-555555555555")
POLICE = uuid.UUID("99999999-8888-7777-6666-555555555555")


@pytest.fixture
def corpus(calls, use_env):
    use_env(AUDIO_STORE_DIR=str(calls.store))
    with calls.db() as conn:
        conn.execute(
            "INSERT INTO bcfy_playlists (uuid, name) VALUES (%s, 'County Fire'), (%s, 'Metro PD')",
            (FIRE, POLICE),
        )
    spoken = [
        # (minutes ago, playlist, talkgroup, display, text)
        (120, FIRE, "7001-101", "Fire Dispatch", "engine twelve respond to a structure fire"),
        (60, POLICE, "7002-201", "PD Ops", "suspect vehicle is a blue sedan heading north"),
        (30, FIRE, "7001-102", "Fire Tac 2", "structure fires on oak avenue, second alarm"),
        (10, FIRE, "7001-101", "Fire Dispatch", "the fire is under control at the structure"),
        (5, FIRE, "7001-101", "Fire Dispatch", "medic three en route to the hospital"),
    ]
    ids = []
    with calls.db() as conn:
        for minutes, playlist, group, display, text in spoken:
            call_id = calls.add(
                ago=timedelta(minutes=minutes), playlist=playlist, group_id=group, display=display
            )
            conn.execute(
                "INSERT INTO transcripts (call_id, text, backend, model, confidence)"
                " VALUES (%s, %s, 'pocketsphinx', 'test', 0.8)",
                (call_id, text),
            )
            ids.append(call_id)
    return ids


def search(capsys, *args):
    code = main(["search", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def search_json(capsys, *args):
    code, out, _ = search(capsys, *args, "--json")
    assert code == 0
    return json.loads(out)


def test_matches_newest_first_with_time_playlist_talkgroup_snippet_and_audio(corpus, calls, capsys):
    code, out, _ = search(capsys, "structure fire")
    assert code == 0
    lines = out.splitlines()
    # Stemmed: "fires" matches; the 60-minute police call and the medic call do not.
    assert lines[-1] == "3 calls, newest first"
    headers = lines[0:9:3]
    assert [h.split("  ")[1:] for h in headers] == [
        ["County Fire", "7001-101 (Fire Dispatch)"],
        ["County Fire", "7001-102 (Fire Tac 2)"],
        ["County Fire", "7001-101 (Fire Dispatch)"],
    ]
    when = datetime.strptime(headers[0][:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs(when - (datetime.now(UTC) - timedelta(minutes=10))) < timedelta(minutes=1)
    assert lines[1].strip() == "the [fire] is under control at the [structure]"
    assert lines[4].strip() == "[structure] [fires] on oak avenue, second alarm"
    assert lines[2].strip() == str(calls.store.resolve() / f"originals/{corpus[3]}.m4a")


def test_filters_by_playlist_group_and_since(corpus, capsys):
    by_name = search_json(capsys, "fire", "--playlist", "county fire")
    assert [h["call_id"] for h in by_name] == [corpus[3], corpus[2], corpus[0]]
    assert [h["call_id"] for h in search_json(capsys, "fire", "--playlist", str(POLICE))] == []
    group = search_json(capsys, "fire", "--group", "7001-102")
    assert [h["call_id"] for h in group] == [corpus[2]]
    recent = search_json(capsys, "fire", "--since", "45m")
    assert [h["call_id"] for h in recent] == [corpus[3], corpus[2]]
    assert [h["call_id"] for h in search_json(capsys, "sedan", "--since", "2h")] == [corpus[1]]


def test_json_output_and_query_syntax(corpus, capsys):
    (hit,) = search_json(capsys, '"blue sedan" -truck')
    assert hit["playlist"] == "Metro PD" and hit["talkgroup"] == "PD Ops"
    assert hit["snippet"] == "suspect vehicle is a blue sedan heading north"
    assert hit["highlighted"] == "suspect vehicle is a <b>blue</b> <b>sedan</b> heading north"
    assert datetime.fromisoformat(hit["started_at"]).tzinfo is not None
    assert [h["call_id"] for h in search_json(capsys, "medic or sedan")] == [
        corpus[4],
        corpus[1],
    ]
    assert search_json(capsys, "ladder") == []
    assert len(search_json(capsys, "fire", "--limit", "2")) == 2


def test_nothing_found_and_bad_arguments_are_said_plainly(corpus, capsys):
    assert search(capsys, "helicopter")[:2] == (0, "no matching calls\n")
    with pytest.raises(SystemExit):
        main(["search", "fire", "--since", "yesterday"])
    assert "expected an age like 30m" in capsys.readouterr().err


def test_since_accepts_ages_and_dates():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2024, 4, 29, 12, 0, tzinfo=UTC)
    assert parse_since("2024-04-30") == datetime(2024, 4, 30, tzinfo=UTC)
    assert parse_since("2024-04-30T08:00:00-04:00").utcoffset() == timedelta(hours=-4)


def test_search_uses_the_full_text_index(corpus, calls):
    with calls.db() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT id FROM transcripts"
                " WHERE search @@ websearch_to_tsquery('english', 'structure fire')"
            ).fetchall()
        )
    assert "transcripts_search" in plan


def test_json_gives_segments_and_the_moment_each_match_was_said(calls, use_env, capsys):
    use_env(AUDIO_STORE_DIR=str(calls.store))
    words = [
        {"start": 0.0, "end": 0.5, "text": "Engine", "confidence": 0.9},
        {"start": 0.5, "end": 0.9, "text": "12,", "confidence": 0.9},
        {"start": 1.0, "end": 1.4, "text": "O'Brien's", "confidence": 0.8},
        {"start": 1.4, "end": 2.0, "text": "structure", "confidence": 0.8},
        {"start": 2.0, "end": 2.4, "text": "fires.", "confidence": 0.7},
    ]
    segments: list[dict[str, Any]] = [
        {"start": 0.0, "end": 2.4, "text": "Engine 12, O'Brien's structure fires.", "words": words},
        {"start": 61.0, "end": 62.5, "text": "Fire out.", "confidence": 0.6, "words": []},
    ]
    call_id = calls.add()
    with calls.db() as conn:
        conn.execute(
            "INSERT INTO transcripts (call_id, text, segments, backend, model)"
            " VALUES (%s, %s, %s, 'whisper', 'test')",
            (call_id, " ".join(str(s["text"]) for s in segments), Jsonb(segments)),
        )
    (hit,) = search_json(capsys, "fire -truck o'brien")
    assert hit["segments"] == segments, "every segment and word, with its times"
    # "fires." matches "fire" (stemmed, punctuation ignored); the second segment has no word
    # times, so its "Fire" cannot be placed.
    assert [(m["text"], m["start"], m["end"]) for m in hit["matches"]] == [
        ("O'Brien's", 1.0, 1.4),
        ("fires.", 2.0, 2.4),
    ]
    code, out, _ = search(capsys, "structure")
    assert code == 0 and out.splitlines()[2].strip() == "said at 0:01.4"
