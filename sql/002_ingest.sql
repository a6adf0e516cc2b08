-- Ingestion: followed playlists with their cursor, every call as served, the poll log,
-- quarantined records, gaps being back-filled, and the geographic reference tables.

ALTER TABLE bcfy_playlists
    ADD COLUMN name            text,
    ADD COLUMN descr           text,
    ADD COLUMN groups          jsonb       NOT NULL DEFAULT '[]',
    ADD COLUMN ctids           integer[]   NOT NULL DEFAULT '{}',
    ADD COLUMN public          boolean,
    ADD COLUMN raw             jsonb,
    -- sync: whether the ingest job polls it (`bcfy playlists sync on|off`).
    ADD COLUMN sync            boolean     NOT NULL DEFAULT true,
    -- The live endpoint's cursor (the last non-zero lastPos, unix seconds). NULL until the
    -- first poll (init=1). Only ever moves forward, and only in the transaction that stores
    -- the calls it covers (or records the gap behind it in bcfy_backfill).
    ADD COLUMN cursor_pos      bigint      CHECK (cursor_pos > 0),
    -- When a poll of it last started: none again within INGEST_MIN_POLL_GAP_SEC.
    ADD COLUMN last_polled_at  timestamptz,
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now();

ALTER TABLE bcfy_calls_raw
    ADD COLUMN playlist_uuid   uuid,                 -- the playlist it was first read from
    ADD COLUMN group_id        text        NOT NULL,
    ADD COLUMN call_ts         bigint      NOT NULL, -- the service's `ts` (whole seconds)
    ADD COLUMN started_at      timestamptz NOT NULL, -- start_ts, else ts
    ADD COLUMN ended_at        timestamptz,          -- end_ts, else start + duration
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
    ADD COLUMN raw             jsonb       NOT NULL, -- the record exactly as served
    ADD COLUMN poll_id         bigint;               -- the bcfy_playlist_poll_log row
-- Call identity. The service names a call by groupId + ts, but ts has whole seconds, so two
-- calls on one talkgroup can share it (two short transmissions within a second): groupId + ts
-- alone would merge them and lose one. Each call has its own audio file, so the url tells
-- them apart, while the same call served twice (re-served across polls, read again from the
-- archive, followed through two playlists) carries the same url and is recognised. The url
-- is kept whole: cutting it down (host, query) could merge two calls, which loses data, while
-- the worst a url served two ways can do is store a call twice.
CREATE UNIQUE INDEX bcfy_calls_raw_identity ON bcfy_calls_raw (group_id, call_ts, url);
CREATE INDEX bcfy_calls_raw_started ON bcfy_calls_raw (started_at DESC);
CREATE INDEX bcfy_calls_raw_playlist_started ON bcfy_calls_raw (playlist_uuid, started_at DESC);

-- One row per request for calls: a live poll (mode init or pos) or one back-fill window.
ALTER TABLE bcfy_playlist_poll_log
    ADD COLUMN playlist_uuid      uuid        NOT NULL,
    ADD COLUMN poll_started_at    timestamptz NOT NULL,
    ADD COLUMN poll_ended_at      timestamptz,
    ADD COLUMN mode               text        NOT NULL DEFAULT 'pos'
                                  CHECK (mode IN ('init', 'pos', 'backfill')),
    ADD COLUMN pos_sent           bigint,     -- live: the cursor sent (NULL with init=1)
    ADD COLUMN last_pos           bigint,     -- live: lastPos as answered (0: no new calls)
    ADD COLUMN server_time        bigint,     -- live: serverTime as answered
    ADD COLUMN group_id           text,       -- back-fill: the group read ...
    ADD COLUMN window_start       bigint,     -- ... and its window [start, end] (ts, inclusive)
    ADD COLUMN window_end         bigint,
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

-- Gaps to recover from group_archives: calls of one group with ts in [next_ts, until_ts] are
-- still to be read. Made in the transaction that moves the cursor past the gap; next_ts
-- advances in the transaction that stores each window's calls, so a restart resumes where it
-- stopped and never reads a window twice.
CREATE TABLE bcfy_backfill (
    id             bigserial   PRIMARY KEY,
    playlist_uuid  uuid        NOT NULL REFERENCES bcfy_playlists (uuid) ON DELETE CASCADE,
    group_id       text        NOT NULL,
    next_ts        bigint      NOT NULL,
    until_ts       bigint      NOT NULL,
    attempts       integer     NOT NULL DEFAULT 0, -- failed requests in a row
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (next_ts <= until_ts)
);
CREATE INDEX bcfy_backfill_next ON bcfy_backfill (next_ts);
CREATE INDEX bcfy_backfill_playlist ON bcfy_backfill (playlist_uuid);

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
