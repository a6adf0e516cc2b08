-- Ingestion: followed playlists with their cursor, every call as served, the poll log,
-- quarantined records, and the geographic reference tables.

ALTER TABLE bcfy_playlists
    ADD COLUMN name            text,
    ADD COLUMN descr           text,
    ADD COLUMN groups          jsonb       NOT NULL DEFAULT '[]',
    ADD COLUMN ctids           integer[]   NOT NULL DEFAULT '{}',
    ADD COLUMN public          boolean,
    ADD COLUMN raw             jsonb,
    -- sync: whether the ingest job polls it (`bcfy playlists sync on|off`).
    ADD COLUMN sync            boolean     NOT NULL DEFAULT true,
    -- The live endpoint's cursor (unix seconds). NULL until the first poll (init=1).
    -- Only ever moves forward, and only in the transaction that stores the calls it covers.
    ADD COLUMN cursor_pos      bigint      CHECK (cursor_pos > 0),
    ADD COLUMN last_polled_at  timestamptz,
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now();

ALTER TABLE bcfy_calls_raw
    ADD COLUMN playlist_uuid   uuid,                 -- the playlist it was first read from
    ADD COLUMN group_id        text        NOT NULL,
    ADD COLUMN call_ts         bigint      NOT NULL, -- the service's `ts` (whole seconds)
    ADD COLUMN started_at      timestamptz NOT NULL,
    ADD COLUMN ended_at        timestamptz,
    ADD COLUMN duration_sec    double precision,
    ADD COLUMN url             text        NOT NULL,
    ADD COLUMN sid             integer,
    ADD COLUMN site_id         integer,
    ADD COLUMN node_id         bigint,
    ADD COLUMN feed_id         integer,
    ADD COLUMN tg_id           integer,
    ADD COLUMN tag             integer,
    ADD COLUMN freq            double precision,
    ADD COLUMN src             bigint,
    ADD COLUMN descr           text,
    ADD COLUMN display         text,
    ADD COLUMN grouping        text,
    ADD COLUMN size_bytes      bigint,
    ADD COLUMN raw             jsonb       NOT NULL,
    ADD COLUMN poll_id         bigint;
-- Call identity: the service names a call by groupId + ts, but ts has whole seconds, so two
-- calls on one talkgroup can share it. Each call has its own audio file, so the url tells
-- them apart, while the same call served twice carries the same url.
CREATE UNIQUE INDEX bcfy_calls_raw_identity ON bcfy_calls_raw (group_id, call_ts, url);
CREATE INDEX bcfy_calls_raw_started ON bcfy_calls_raw (started_at DESC);
CREATE INDEX bcfy_calls_raw_playlist_started ON bcfy_calls_raw (playlist_uuid, started_at DESC);

ALTER TABLE bcfy_playlist_poll_log
    ADD COLUMN playlist_uuid      uuid        NOT NULL,
    ADD COLUMN poll_started_at    timestamptz NOT NULL,
    ADD COLUMN poll_ended_at      timestamptz,
    ADD COLUMN mode               text        NOT NULL DEFAULT 'pos'
                                  CHECK (mode IN ('init', 'pos', 'backfill')),
    ADD COLUMN pos_sent           bigint,
    ADD COLUMN last_pos           bigint,
    ADD COLUMN success            boolean     NOT NULL DEFAULT false,
    ADD COLUMN calls_received     integer     NOT NULL DEFAULT 0,
    ADD COLUMN calls_new          integer     NOT NULL DEFAULT 0,
    ADD COLUMN calls_duplicate    integer     NOT NULL DEFAULT 0,
    ADD COLUMN calls_quarantined  integer     NOT NULL DEFAULT 0,
    ADD COLUMN http_status        integer,
    ADD COLUMN error              text;
CREATE INDEX bcfy_playlist_poll_log_started ON bcfy_playlist_poll_log (poll_started_at DESC);
CREATE INDEX bcfy_playlist_poll_log_playlist ON bcfy_playlist_poll_log
    (playlist_uuid, poll_started_at DESC);

-- Records that failed validation: kept with the reason, never silently dropped.
CREATE TABLE bcfy_calls_quarantine (
    id             bigserial   PRIMARY KEY,
    playlist_uuid  uuid,
    poll_id        bigint,
    polled_at      timestamptz NOT NULL,
    reason         text        NOT NULL,
    raw            jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bcfy_calls_quarantine_created ON bcfy_calls_quarantine (created_at DESC);

ALTER TABLE bcfy_countries
    ADD COLUMN name        text,
    ADD COLUMN code        text,
    ADD COLUMN iso_alpha2  text,
    ADD COLUMN raw         jsonb       NOT NULL DEFAULT '{}',
    ADD COLUMN fetched_at  timestamptz NOT NULL DEFAULT now();

ALTER TABLE bcfy_states
    ADD COLUMN country_id  integer,
    ADD COLUMN name        text,
    ADD COLUMN code        text,
    ADD COLUMN raw         jsonb       NOT NULL DEFAULT '{}',
    ADD COLUMN fetched_at  timestamptz NOT NULL DEFAULT now();
CREATE INDEX bcfy_states_country ON bcfy_states (country_id);

ALTER TABLE bcfy_counties
    ADD COLUMN state_id    integer,
    ADD COLUMN name        text,
    ADD COLUMN raw         jsonb       NOT NULL DEFAULT '{}',
    ADD COLUMN fetched_at  timestamptz NOT NULL DEFAULT now();
CREATE INDEX bcfy_counties_state ON bcfy_counties (state_id);
