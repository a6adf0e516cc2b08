-- Transcription: one work row per call whose audio is ready (the dispatcher's queue, with its
-- leases), and at most one transcript per call, searchable with PostgreSQL full-text search.

CREATE TABLE call_transcription (
    call_id           bigint      PRIMARY KEY REFERENCES bcfy_calls_raw (id) ON DELETE CASCADE,
    -- Copied from the call (it never changes) so that the dispatcher's order is one index.
    call_started_at   timestamptz NOT NULL,
    -- pending: ready, never sent; dispatched: a message was sent (or a retry is scheduled);
    -- running: a worker claimed it; done: it has its transcript; failed: permanently, see
    -- last_error.
    state             text        NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'dispatched', 'running', 'done', 'failed')),
    -- When the dispatcher may (re)send it: now for pending; the end of the dispatch lease for
    -- dispatched (a crash between marking and sending loses nothing: it is sent again when
    -- the lease runs out); the end of the claim for running (a claim lasts the task's hard
    -- time limit, so a claim can only run out once its holder is certainly gone).
    due_at            timestamptz,
    dispatched_at     timestamptz,
    dispatch_count    integer     NOT NULL DEFAULT 0,
    -- Claims by a worker; the retry budget counts them (a call that kills its worker every
    -- time ends as failed, not in a loop).
    attempts          integer     NOT NULL DEFAULT 0,
    claimed_by        text,
    claimed_at        timestamptz,
    last_error        text,
    finished_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((state IN ('done', 'failed')) = (due_at IS NULL)),
    CHECK (state <> 'failed' OR last_error IS NOT NULL)
);
-- The dispatcher's path: calls not finished, in call order (either direction). Rows in flight
-- (a bounded number: the queue's limit plus what runs) are skipped by their due_at.
CREATE INDEX call_transcription_open ON call_transcription (call_started_at, call_id)
    WHERE state IN ('pending', 'dispatched', 'running');
CREATE INDEX call_transcription_failed ON call_transcription (finished_at DESC)
    WHERE state = 'failed';

-- A call becomes transcribable when its audio becomes ready. Row triggers, each filtered by
-- WHEN, so the audio stage's other updates cost nothing. Audio made ready again after a
-- permanent transcription failure (re-prepared) gives the call a new chance.
CREATE FUNCTION call_transcription_for_ready_audio() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO call_transcription (call_id, call_started_at, due_at)
    SELECT c.id, c.started_at, now() FROM bcfy_calls_raw c WHERE c.id = NEW.call_id
    ON CONFLICT (call_id) DO UPDATE
        SET state = 'pending', due_at = now(), attempts = 0, last_error = NULL,
            finished_at = NULL, updated_at = now()
        WHERE call_transcription.state = 'failed';
    RETURN NULL;
END $$;

CREATE TRIGGER call_transcription_on_ready_insert
    AFTER INSERT ON call_audio
    FOR EACH ROW WHEN (NEW.state = 'ready')
    EXECUTE FUNCTION call_transcription_for_ready_audio();

CREATE TRIGGER call_transcription_on_ready_update
    AFTER UPDATE OF state ON call_audio
    FOR EACH ROW WHEN (NEW.state = 'ready' AND OLD.state IS DISTINCT FROM 'ready')
    EXECUTE FUNCTION call_transcription_for_ready_audio();

INSERT INTO call_transcription (call_id, call_started_at, due_at)
SELECT c.id, c.started_at, now()
  FROM call_audio a JOIN bcfy_calls_raw c ON c.id = a.call_id
 WHERE a.state = 'ready'
ON CONFLICT DO NOTHING;

-- The transcripts. At most one per call: the unique key is what makes a duplicate delivery
-- harmless, whatever the workers do.
ALTER TABLE transcripts
    ADD COLUMN call_id            bigint      NOT NULL
                                  REFERENCES bcfy_calls_raw (id) ON DELETE CASCADE,
    ADD COLUMN text               text        NOT NULL,
    -- [{"start": s, "end": s, "text": "...", "confidence": 0..1 | null}, ...], seconds from
    -- the start of the call.
    ADD COLUMN segments           jsonb       NOT NULL DEFAULT '[]'
                                  CHECK (jsonb_typeof(segments) = 'array'),
    ADD COLUMN language           text,
    ADD COLUMN backend            text        NOT NULL,   -- pocketsphinx, openai
    ADD COLUMN model              text        NOT NULL,
    ADD COLUMN confidence         real        CHECK (confidence BETWEEN 0 AND 1),
    ADD COLUMN audio_duration_sec double precision,
    ADD COLUMN processing_sec     double precision,
    ADD COLUMN search             tsvector
                                  GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    ADD CONSTRAINT transcripts_one_per_call UNIQUE (call_id);
CREATE INDEX transcripts_search ON transcripts USING gin (search);
CREATE INDEX transcripts_created ON transcripts (created_at DESC);
