"""Keyword alerts: the notify pool's Celery entry points.

Matching happens where the transcript is stored (workers.alerts.matching, called by
tasks.transcription.claims.store_transcript); sending, claims and the sweep are in
workers.alerts.delivery; `bcfy alerts` manages the rules (workers.cli.alerts). Imported here
so that the app's `include` registers the tasks.
"""

from tasks.alerts import jobs

__all__ = ["jobs"]
