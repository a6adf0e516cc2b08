"""`bcfy audio retry` reaches past the audio stage, and says so.

A retried call whose audio becomes ready again is taken up by the transcription stage like any
newly ready call (the trigger on call_audio in sql/004_transcription.sql): one whose
transcription had failed for good starts over with its attempts reset, one with no transcription
gets one, one already transcribed keeps its transcript. The command counts these before it acts,
and its help and the README say the same words (RETRY_EFFECT).

The failed state is set directly (as after policy refusals, `disallowed_host`); the retry runs as
an operator runs it, and the audio is prepared again by a real audio worker from the feed
simulator, so the transcription rows change by the statement that really marks audio ready.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.audio import add_calls, make_env, start_audio, states
from workers.cli.audio import RETRY_EFFECT
from workers.dev.procs import ROOT, run_cli, wait_until

CLAIM_JOB = "tasks.audio.process_pending_audio"


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def transcription(db: Any, call_id: int) -> dict[str, Any] | None:
    cur = db.execute(
        "SELECT state, attempts, last_error, finished_at, due_at FROM call_transcription"
        " WHERE call_id = %s",
        (call_id,),
    )
    row = cur.fetchone()
    return None if row is None else dict(zip([d.name for d in cur.description], row, strict=True))


def test_help_and_readme_say_what_a_retry_does_to_transcription(clean):
    shown = run_cli("audio", "retry", "--help", env={"DATABASE_URL": clean.database_url})
    assert shown.returncode == 0, shown.stderr
    assert RETRY_EFFECT in _words(shown.stdout)
    assert RETRY_EFFECT in _words((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_a_retried_call_is_transcribed_afresh_once_its_audio_is_ready(
    db, clean, procs, client, sim, tmp_path: Path
):
    fresh, failed_before, transcribed = add_calls(db, sim, 3)
    # All three failed at the audio stage; two had transcription rows (as after audio that was
    # ready once): one failed for good after 3 attempts, one done with its transcript.
    db.execute(
        "UPDATE call_audio SET state = 'failed', attempts = 1, error_code = 'disallowed_host',"
        " last_error = 'host not allowed', updated_at = now()"
    )
    db.execute(
        "INSERT INTO call_transcription (call_id, call_started_at, state, due_at, attempts,"
        "                                last_error, finished_at)"
        " SELECT id, started_at, 'failed', NULL, 3, 'recogniser crashed', now()"
        "   FROM bcfy_calls_raw WHERE id = %s",
        (failed_before,),
    )
    db.execute(
        "INSERT INTO call_transcription (call_id, call_started_at, state, due_at, attempts,"
        "                                finished_at)"
        " SELECT id, started_at, 'done', NULL, 1, now() FROM bcfy_calls_raw WHERE id = %s",
        (transcribed,),
    )
    db.execute(
        "INSERT INTO transcripts (call_id, text, backend, model)"
        " VALUES (%s, 'engine two on scene', 'pocketsphinx', 'en-us')",
        (transcribed,),
    )

    out = run_cli(
        "audio", "retry", "--code", "disallowed_host", env={"DATABASE_URL": clean.database_url}
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3 failed calls back to pending"
    assert "  1 without a transcription yet: transcribed" in lines
    assert (
        "  1 whose transcription failed for good (3 attempts in all):"
        " transcribed afresh, transcription attempts reset to 0"
    ) in lines
    assert "  1 already transcribed: keep their transcript" in lines
    # The retry itself leaves the transcription stage alone: nothing happens there until the
    # audio is ready again.
    before = transcription(db, failed_before)
    assert before is not None and (before["state"], before["attempts"]) == ("failed", 3)
    assert transcription(db, fresh) is None

    env = make_env(clean, tmp_path, sim)
    start_audio(procs, env, tmp_path, concurrency=1)
    client.send_task(CLAIM_JOB, queue="audio")
    wait_until(lambda: states(db) == {"ready": 3}, 120, "the retried calls ready")

    again = transcription(db, failed_before)
    assert again is not None
    assert (again["state"], again["attempts"], again["last_error"]) == ("pending", 0, None)
    assert again["finished_at"] is None and again["due_at"] is not None, "due for dispatch"
    new = transcription(db, fresh)
    assert new is not None and (new["state"], new["attempts"]) == ("pending", 0)
    kept = transcription(db, transcribed)
    assert kept is not None and (kept["state"], kept["attempts"]) == ("done", 1)
    (text,) = db.execute(
        "SELECT text FROM transcripts WHERE call_id = %s", (transcribed,)
    ).fetchone()
    assert text == "engine two on scene"
