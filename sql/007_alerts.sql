-- Keyword alerts: rules (`bcfy alerts`), their targets, the outbox that matching writes in the
-- transaction that stores a transcript (one row per rule and call), and one delivery per
-- outbox row and target, which the notify pool sends.

CREATE TABLE alert_rules (
    id               bigserial   PRIMARY KEY,
    name             text        NOT NULL UNIQUE,
    -- As typed (web-search syntax, as `bcfy search`), and parsed once, the way search parses.
    query            text        NOT NULL,
    tsquery          tsquery     GENERATED ALWAYS AS (websearch_to_tsquery('english', query))
                                 STORED,
    playlist_uuid    uuid,
    group_id         text,
    min_confidence   real        CHECK (min_confidence BETWEEN 0 AND 1),
    enabled          boolean     NOT NULL DEFAULT true,
    -- Throttling (ALERT_MAX_PER_MINUTE): the current minute's start and the notifications it
    -- has sent. Matching updates them, so concurrent matches of one rule take turns here.
    window_start     timestamptz,
    window_sent      integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now()
);
-- Matching evaluates every enabled rule's tsquery against the new transcript: with 1,000
-- rules a scan of them is cheaper than a GIN lookup of the rules by the transcript's lexemes
-- (tried: 0.6 ms against 1.5 ms per transcript, bench/alerts.py's rules), so no index here.

CREATE TABLE alert_targets (
    id                   bigserial   PRIMARY KEY,
    rule_id              bigint      NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    -- An Apprise URL or an http(s) JSON webhook. A secret (it carries tokens): never logged
    -- or shown whole; `shown` is what people see.
    url                  text        NOT NULL,
    shown                text        NOT NULL,
    -- A target that keeps failing is marked (bcfy status, bcfy alerts show).
    consecutive_failures integer     NOT NULL DEFAULT 0,
    last_error           text,
    last_failure_at      timestamptz,
    last_success_at      timestamptz,
    UNIQUE (rule_id, url)
);

CREATE TABLE alert_outbox (
    id               bigserial   PRIMARY KEY,
    rule_id          bigint      NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    -- NULL for a summary ("and 7 more calls") of a throttled burst.
    call_id          bigint      REFERENCES bcfy_calls_raw (id) ON DELETE CASCADE,
    -- notify: has deliveries; throttled: over ALERT_MAX_PER_MINUTE, waiting for its summary;
    -- summarized: counted in the summary `summary_id`; summary: the summary itself.
    state            text        NOT NULL
                     CHECK (state IN ('notify', 'throttled', 'summarized', 'summary')),
    summary_id       bigint      REFERENCES alert_outbox (id) ON DELETE SET NULL,
    summary_count    integer,
    -- When the transcript was stored (the same transaction): the delay is measured from here.
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((call_id IS NULL) = (state = 'summary'))
);
-- Exactly one notification per rule and call, whatever stores the transcript how often.
CREATE UNIQUE INDEX alert_outbox_rule_call ON alert_outbox (rule_id, call_id)
    WHERE call_id IS NOT NULL;
CREATE INDEX alert_outbox_throttled ON alert_outbox (rule_id, created_at)
    WHERE state = 'throttled';
CREATE INDEX alert_outbox_call ON alert_outbox (call_id);

CREATE TABLE alert_deliveries (
    id               bigserial   PRIMARY KEY,
    outbox_id        bigint      NOT NULL REFERENCES alert_outbox (id) ON DELETE CASCADE,
    target_id        bigint      NOT NULL REFERENCES alert_targets (id) ON DELETE CASCADE,
    -- Sent with every try of this delivery (the Idempotency-Key header of JSON targets): a
    -- receiver that sees it twice is seeing one notification sent again.
    idempotency_key  uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    -- pending: due at due_at; sending: claimed by claimed_by until claimed_until; sent; failed
    -- for good (refused, or out of attempts), see last_error.
    state            text        NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sending', 'sent', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    due_at           timestamptz,
    claimed_by       text,
    claimed_until    timestamptz,
    last_error       text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (outbox_id, target_id),
    CHECK ((state = 'pending') = (due_at IS NOT NULL)),
    CHECK ((state = 'sending') = (claimed_until IS NOT NULL))
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (due_at) WHERE state = 'pending';
CREATE INDEX alert_deliveries_sending ON alert_deliveries (claimed_until)
    WHERE state = 'sending';
CREATE INDEX alert_deliveries_target ON alert_deliveries (target_id);
