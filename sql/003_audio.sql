-- Audio: one row per call, made when the call is stored; the audio pool's work queue and the
-- record of what it produced.

CREATE TABLE call_audio (
    call_id           bigint      PRIMARY KEY REFERENCES bcfy_calls_raw (id) ON DELETE CASCADE,
    state             text        NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'downloading', 'ready', 'failed')),
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    -- A claim is a lease: who took the call and until when. A lease that ran out (its worker
    -- died) makes the call claimable again.
    lease_owner       text,
    lease_until       timestamptz,
    last_error        text,
    -- What was stored, relative to AUDIO_STORE_DIR: the original as served, and the one
    -- conversion for recognisers (16 kHz mono, lossless).
    original_path     text,
    original_bytes    bigint,
    original_sha256   text,
    prepared_path     text,
    prepared_bytes    bigint,
    prepared_sha256   text,
    measured_duration_sec double precision,
    ready_at          timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (state <> 'ready' OR (prepared_path IS NOT NULL AND ready_at IS NOT NULL))
);
-- The claim query's path: due pending calls, oldest first.
CREATE INDEX call_audio_due ON call_audio (next_attempt_at, call_id)
    WHERE state IN ('pending', 'downloading');
CREATE INDEX call_audio_ready ON call_audio (ready_at) WHERE state = 'ready';

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
