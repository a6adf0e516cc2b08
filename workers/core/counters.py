"""The all-time counters that outlive retention: what each counts, defined once.

`bcfy status` and the metrics endpoint read them (workers.cli.status.counters); the maintenance
job folds them into history_totals before it prunes the rows they count (tasks.maintenance).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counter:
    """An all-time counter that outlives retention (tasks/maintenance/): the rows of `table`
    matching `where`, by `label` and `outcome`, counted by their `time` column. Rows up to the
    kind's checkpoint are summed in history_totals (maintenance folds them before it prunes);
    the rest are counted live, one index range on `time`."""

    kind: str
    table: str
    time: str
    where: str = "true"
    label: str = "''"
    outcome: str = "''"


COUNTERS = (
    Counter("calls", "bcfy_calls_raw", "created_at"),
    Counter("quarantine", "bcfy_calls_quarantine", "created_at"),
    Counter("audio_ready", "call_audio", "ready_at", "state = 'ready'"),
    Counter("audio_failed", "call_audio", "updated_at", "state = 'failed'"),
    Counter("transcripts", "transcripts", "created_at"),
    Counter("transcription_failed", "call_transcription", "finished_at", "state = 'failed'"),
    Counter(
        "polls",
        "bcfy_playlist_poll_log",
        "poll_started_at",
        outcome="CASE WHEN success THEN 'ok' ELSE 'error' END",
    ),
    Counter("job_runs", "job_runs", "started_at", label="job", outcome="outcome"),
)
