-- Audio: one row per call, made when the call is stored; the audio pool's work queue and the
-- record of what it produced. Plus one row per attempt, for operators and tests.
--
-- A row's life:  pending --claim--> downloading --> ready
--                   ^                    |
--                   +---- retry ---------+--> failed (attempts used up, or refused by policy)
-- A claim is a lease (lease_owner, lease_until), renewed while the call is worked on; only the
-- lease holder may write the outcome. A lease that ran out (its worker died) makes the call
-- claimable again.

CREATE TABLE call_audio (
    call_id           bigint      PRIMARY KEY REFERENCES bcfy_calls_raw (id) ON DELETE CASCADE,
    state             text        NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'downloading', 'ready', 'failed')),
    -- Claims so far (a claim counts whether it ends in success, failure or a dead worker).
    attempts          integer     NOT NULL DEFAULT 0,
    -- When the row is next due for a claim: for 'pending', after the backoff; for
    -- 'downloading', when its lease runs out (kept equal to lease_until).
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_until       timestamptz,
    -- Why the last attempt failed: a short code (http_404, not_audio, too_large, ...) and text.
    error_code        text,
    last_error        text,
    -- What was stored, relative to AUDIO_STORE_DIR: the original as served, and the one
    -- conversion for recognisers (16 kHz mono 16-bit FLAC).
    original_path     text,
    original_bytes    bigint,
    original_sha256   text,
    original_codec    text,
    prepared_path     text,
    prepared_bytes    bigint,
    prepared_sha256   text,
    measured_duration_sec double precision,
    ready_at          timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (state <> 'ready' OR (prepared_path IS NOT NULL AND ready_at IS NOT NULL)),
    CHECK (state <> 'downloading' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL))
);
-- The claim's path: due calls (pending past their backoff, or leases run out), oldest first.
CREATE INDEX call_audio_due ON call_audio (next_attempt_at, call_id)
    WHERE state IN ('pending', 'downloading');
-- Calls in flight (live leases), counted before each claim.
CREATE INDEX call_audio_leased ON call_audio (lease_until) WHERE state = 'downloading';
CREATE INDEX call_audio_ready ON call_audio (ready_at) WHERE state = 'ready';

-- One row per attempt to prepare a call: which claim, which worker process, how it ended.
-- outcome stays NULL when the worker died mid-attempt.
CREATE TABLE call_audio_attempts (
    id            bigserial   PRIMARY KEY,
    call_id       bigint      NOT NULL REFERENCES call_audio (call_id) ON DELETE CASCADE,
    attempt       integer     NOT NULL,
    lease_owner   text        NOT NULL,
    worker        text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    outcome       text        CHECK (outcome IN ('ready', 'retry', 'failed', 'lease_lost')),
    error_code    text,
    error         text,
    bytes         bigint,
    download_ms   integer,
    prepare_ms    integer
);
CREATE INDEX call_audio_attempts_call ON call_audio_attempts (call_id, started_at);
CREATE INDEX call_audio_attempts_started ON call_audio_attempts (started_at DESC);

-- Every stored call gets its audio row in the same statement that stores it. A statement-level
-- trigger costs one INSERT ... SELECT per batch, not one per row, and keeps ingestion unaware
-- of the audio stage.
CREATE FUNCTION call_audio_for_new_calls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO call_audio (call_id) SELECT id FROM new_calls ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER call_audio_for_new_calls
    AFTER INSERT ON bcfy_calls_raw
    REFERENCING NEW TABLE AS new_calls
    FOR EACH STATEMENT EXECUTE FUNCTION call_audio_for_new_calls();

INSERT INTO call_audio (call_id) SELECT id FROM bcfy_calls_raw ON CONFLICT DO NOTHING;
