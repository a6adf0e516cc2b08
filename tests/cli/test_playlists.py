"""`bcfy playlists add | list | sync | remove`, run as the operator runs them."""

from __future__ import annotations

import subprocess
import uuid as uuid_mod

from tests.support.ingest import Ingest
from workers.dev.procs import run_cli


def bcfy(ing: Ingest, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k.startswith(("BCFY_", "INGEST_", "GEO_"))}
    env |= {"DATABASE_URL": ing.services.database_url, "REDIS_URL": ing.services.redis_url}
    return run_cli("playlists", *args, env=env)


def test_add_list_pause_resume_remove(ingest):
    ing = ingest
    uuid = ing.sim.add_playlist(name="Cook County Fire", calls_per_minute=0)
    out = bcfy(ing, "add", uuid)
    assert out.returncode == 0, out.stderr
    assert f"following {uuid}: Cook County Fire - 3 groups" in out.stdout
    (name, groups, ctids, sync, cursor) = ing.sql(
        "SELECT name, groups, ctids, sync, cursor_pos FROM bcfy_playlists WHERE uuid = %s", uuid
    )[0]
    assert name == "Cook County Fire" and sync and cursor is None
    assert len(groups) == 3 and all("groupId" in g for g in groups)
    assert ctids

    assert "refreshed" in bcfy(ing, "add", uuid).stdout  # again: refreshed, cursor kept
    listed = bcfy(ing, "list")
    assert listed.returncode == 0
    assert (
        uuid in listed.stdout and "Cook County Fire" in listed.stdout and "never" in listed.stdout
    )

    assert bcfy(ing, "sync", uuid, "off").returncode == 0
    assert ing.sql("SELECT sync FROM bcfy_playlists")[0][0] is False
    assert " off " in bcfy(ing, "list").stdout
    assert bcfy(ing, "sync", uuid, "on").returncode == 0
    assert ing.sql("SELECT sync FROM bcfy_playlists")[0][0] is True

    removed = bcfy(ing, "remove", uuid)
    assert removed.returncode == 0 and "its stored calls stay" in removed.stdout
    assert not ing.sql("SELECT 1 FROM bcfy_playlists")
    assert "no playlists followed" in bcfy(ing, "list").stdout


def test_mistakes_get_clear_messages(ingest):
    ing = ingest
    bad = bcfy(ing, "add", "not-a-uuid")
    assert bad.returncode == 2 and "not a playlist uuid" in bad.stderr
    unknown = str(uuid_mod.uuid4())
    out = bcfy(ing, "add", unknown)
    assert out.returncode == 1 and "unknown playlist" in out.stderr
    assert "Traceback" not in out.stderr
    assert not ing.sql("SELECT 1 FROM bcfy_playlists")
    assert bcfy(ing, "remove", unknown).returncode == 1
    missing = bcfy(ing, "sync", unknown, "on")
    assert missing.returncode == 1 and "not followed" in missing.stderr


def test_add_with_an_unknown_key_says_so(ingest):
    ing = ingest
    ing.configure(BCFY_API_KEY_ID="nope")
    out = bcfy(ing, "add", ing.sim.add_playlist())
    assert out.returncode == 1 and "BCFY_API_KEY_ID" in out.stderr
    assert "Traceback" not in out.stderr


def test_resuming_goes_on_from_the_cursor_or_from_now(ingest):
    ing = ingest
    uuid = ing.sim.add_playlist(calls_per_minute=0)
    assert bcfy(ing, "add", uuid).returncode == 0
    ing.sql("UPDATE bcfy_playlists SET cursor_pos = 1750000000")
    ing.sql(
        "INSERT INTO bcfy_backfill (playlist_uuid, group_id, next_ts, until_ts)"
        " VALUES (%s, 'g', 1, 2)",
        uuid,
    )
    assert bcfy(ing, "sync", uuid, "off").returncode == 0
    resumed = bcfy(ing, "sync", uuid, "on")
    assert "goes on from 2025-06-15 15:06:40 UTC" in resumed.stdout
    assert ing.sql("SELECT cursor_pos FROM bcfy_playlists")[0][0] == 1750000000
    fresh = bcfy(ing, "sync", uuid, "on", "--from-now")
    assert fresh.returncode == 0 and "goes on from" not in fresh.stdout
    assert ing.sql("SELECT cursor_pos FROM bcfy_playlists")[0][0] is None
    assert not ing.sql("SELECT 1 FROM bcfy_backfill")
    assert bcfy(ing, "sync", uuid, "off", "--from-now").returncode == 2
