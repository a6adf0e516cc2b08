-- Foundation: the run log of the periodic jobs, and the seed's tables under their old names.
-- Later migrations settle the columns of the bcfy_* tables and transcripts.

CREATE TABLE job_runs (
    id          bigserial PRIMARY KEY,
    job         text        NOT NULL,
    worker      text        NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('ok', 'error', 'skipped', 'lost_lock')),
    error       text,
    CHECK (ended_at >= started_at)
);
CREATE INDEX job_runs_job_started ON job_runs (job, started_at DESC);
CREATE INDEX job_runs_started ON job_runs (started_at DESC);

CREATE TABLE bcfy_playlists (
    uuid        uuid PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bcfy_calls_raw (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bcfy_playlist_poll_log (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bcfy_countries (
    country_id  integer PRIMARY KEY  -- the service's coid
);

CREATE TABLE bcfy_states (
    state_id    integer PRIMARY KEY  -- the service's stid
);

CREATE TABLE bcfy_counties (
    county_id   integer PRIMARY KEY  -- the service's ctid (a reserved name here)
);

CREATE TABLE transcripts (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);
