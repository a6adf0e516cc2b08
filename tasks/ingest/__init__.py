"""Ingest: poll the followed Broadcastify playlists and store every call exactly once.

One module per concept, each importing only those listed before it:

  validation  which call records can be stored (validate_call, split_page, Page, the limits)
  storage     one page stored in one transaction: calls, quarantine, cursor, poll log row
  backfill    gaps the live endpoint no longer serves, read from group_archives in windows
  polling     the live poll: claim a playlist, ask after its cursor, the retention leap
  jobs        the Celery entry points under their fixed names (tasks.ingest.poll_followed_playlists,
              tasks.ingest.backfill_gaps) and the triggers they send

Importing the package imports `jobs`, so the Celery app's `include=["tasks.ingest"]` registers
the tasks.
"""

from tasks.ingest import jobs

__all__ = ["jobs"]
