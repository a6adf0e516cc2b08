"""Files go with their rows.

The transaction that NULLs a path column (or deletes the call) also lists the file in
audio_file_trash (tasks.maintenance.rows); the file is removed after the commit, then its entry.
A crash between the two leaves an entry whose file is removed by the next run (a missing file is
fine): never a row pointing to a missing file, never a file no table knows about. Removing the
files first and then NULLing the rows would, after a crash, leave rows pointing to missing
files; NULLing without a list would leave files nobody can find.
"""

from __future__ import annotations

import logging

from tasks.maintenance.run import Run
from workers.audio.store import is_valid_key
from workers.core.runtime import db_connection

log = logging.getLogger(__name__)


async def empty_trash(run: Run) -> None:
    while await _trash_batch(run):
        await run.next_batch()


async def _trash_batch(run: Run) -> int:
    """Remove the next listed files, then their entries. A file a call_audio row names
    again (the same key written anew) is kept: only the entry goes."""
    async with db_connection() as conn:
        rows = await (
            await conn.execute(
                """SELECT t.key, EXISTS (SELECT 1 FROM call_audio a WHERE a.call_id = t.call_id
                             AND t.key IN (a.original_path, a.prepared_path))
                     FROM audio_file_trash t ORDER BY t.key LIMIT %s""",
                (run.batch,),
            )
        ).fetchall()
    if not rows:
        return 0
    doomed = [key for key, referenced in rows if not referenced]
    removed = await _remove(run, doomed)
    run.ensure_lock()
    async with db_connection() as conn:
        await conn.execute(
            "DELETE FROM audio_file_trash WHERE key = ANY(%s)", ([k for k, _ in rows],)
        )
    run.report.files_removed += removed
    return len(rows)


async def _remove(run: Run, keys: list[str]) -> int:
    """Through the store (files, or objects in one bulk request). A key that is not one of
    the store's (outside its root) is logged and its entry dropped."""
    valid = []
    for key in keys:
        if not is_valid_key(key):
            log.error("maintenance: %r is outside the audio store; entry dropped", key)
        else:
            valid.append(key)
    return await run.store.delete(valid) if valid else 0
