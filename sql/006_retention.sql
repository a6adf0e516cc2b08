-- Retention (tasks/maintenance.py): history is pruned after its own RETENTION_* setting; audio
-- files go with their rows; the all-time counters the metrics endpoint serves survive pruning;
-- and every status and metrics query reads an index range, not a year of history.

-- Audio files removed by retention: the path column is NULL and the time it went is kept, so a
-- ready call may have no prepared file once its transcription is long done.
ALTER TABLE call_audio
    ADD COLUMN original_pruned_at timestamptz,
    ADD COLUMN prepared_pruned_at timestamptz;
ALTER TABLE call_audio DROP CONSTRAINT call_audio_check;
ALTER TABLE call_audio ADD CONSTRAINT call_audio_ready_has_audio
    CHECK (state <> 'ready' OR (ready_at IS NOT NULL
                                AND (prepared_path IS NOT NULL OR prepared_pruned_at IS NOT NULL)));

-- Files to remove. A row leaves call_audio's path column (or the call is deleted) in the same
-- transaction that puts its file here; the file is removed after that commit, then its entry.
-- A crash in between leaves only an entry, and its file, for the next run: never a row
-- pointing to a missing file, never a file nobody knows about.
CREATE TABLE audio_file_trash (
    key        text        PRIMARY KEY,  -- relative to AUDIO_STORE_DIR, as call_audio had it
    call_id    bigint      NOT NULL,
    queued_at  timestamptz NOT NULL DEFAULT now()
);

-- All-time counters that outlive pruning. For each kind of history, rows up to `upto` have
-- been counted into history_totals (by label and outcome); a counter is that sum plus a count
-- of the rows after `upto`, which the time index reads. Rows are only pruned once counted.
CREATE TABLE history_checkpoints (
    kind  text        PRIMARY KEY,
    upto  timestamptz NOT NULL
);
CREATE TABLE history_totals (
    kind     text   NOT NULL,
    label    text   NOT NULL DEFAULT '',
    outcome  text   NOT NULL DEFAULT '',
    n        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, label, outcome)
);

-- Calls stored in the last 5 minutes / hour (status), and the calls counter.
CREATE INDEX bcfy_calls_raw_created ON bcfy_calls_raw (created_at);
-- Failed audio by when it failed (status windows, top failures, the counter).
CREATE INDEX call_audio_failed ON call_audio (updated_at) WHERE state = 'failed';
-- Files still on disk, by when the call became ready: what the pruning of files reads.
CREATE INDEX call_audio_original_kept ON call_audio (ready_at)
    WHERE state = 'ready' AND original_path IS NOT NULL;
CREATE INDEX call_audio_prepared_kept ON call_audio (ready_at)
    WHERE state = 'ready' AND prepared_path IS NOT NULL;
