-- Transcripts say why they are empty, keep what was dropped, and carry word timings.
--
-- Word timings need no column of their own: each element of `segments` gains a `words` array,
-- [{"start": s, "end": s, "text": "...", "confidence": 0..1 | null}, ...], seconds from the
-- start of the call. The whisper and pocketsphinx backends always fill it; the openai backend
-- when the service sends words (OpenAI does, asked with timestamp_granularities[]=word); it is
-- empty otherwise, and older transcripts' segments have no `words` key at all.

ALTER TABLE transcripts
    -- Why the text is empty: no_speech (the recogniser found no speech) or dropped (it wrote
    -- something, and every segment was judged unreliable: see dropped_segments). NULL for a
    -- transcript with text.
    ADD COLUMN empty_reason     text  CHECK (empty_reason IN ('no_speech', 'dropped')),
    -- Segments the recogniser produced and the pipeline did not believe, with the reason:
    -- [{"start": s, "end": s, "text": "...", "reason": "no_speech_prob 0.95 > 0.6"}, ...]
    ADD COLUMN dropped_segments jsonb NOT NULL DEFAULT '[]'
                                CHECK (jsonb_typeof(dropped_segments) = 'array');

UPDATE transcripts SET empty_reason = 'no_speech' WHERE text = '';

ALTER TABLE transcripts ADD CONSTRAINT transcripts_empty_has_reason
    CHECK ((text = '') = (empty_reason IS NOT NULL));
