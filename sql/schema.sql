-- The whole schema after the migrations sql/001_foundation.sql .. sql/007_transcript_timings.sql,
-- table by table: each with its sequences, defaults, keys, indexes, foreign keys and
-- triggers.
-- Written by `bcfy schema` (`make schema`) from PostgreSQL 15's pg_dump. Do not
-- edit: change the schema with a new migration, then regenerate
-- (tests/core/test_schema.py checks that this file is current). Databases are made by
-- `bcfy migrate`, not from this file.

-- Functions (the triggers below call them)

CREATE FUNCTION public.call_audio_for_new_calls() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO call_audio (call_id) SELECT id FROM new_calls ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE FUNCTION public.call_transcription_for_ready_audio() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO call_transcription (call_id, call_started_at, due_at)
    SELECT c.id, c.started_at, now() FROM bcfy_calls_raw c WHERE c.id = NEW.call_id
    ON CONFLICT (call_id) DO UPDATE
        SET state = 'pending', due_at = now(), attempts = 0, last_error = NULL,
            finished_at = NULL, updated_at = now()
        WHERE call_transcription.state = 'failed';
    RETURN NULL;
END $$;

-- audio_file_trash ------------------------------------------------------------------------------

CREATE TABLE public.audio_file_trash (
    key text NOT NULL,
    call_id bigint NOT NULL,
    queued_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY public.audio_file_trash
    ADD CONSTRAINT audio_file_trash_pkey PRIMARY KEY (key);

-- bcfy_calls_quarantine -------------------------------------------------------------------------

CREATE TABLE public.bcfy_calls_quarantine (
    id bigint NOT NULL,
    playlist_uuid uuid,
    poll_id bigint,
    polled_at timestamp with time zone NOT NULL,
    reason text NOT NULL,
    raw jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE SEQUENCE public.bcfy_calls_quarantine_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.bcfy_calls_quarantine_id_seq OWNED BY public.bcfy_calls_quarantine.id;

ALTER TABLE ONLY public.bcfy_calls_quarantine ALTER COLUMN id SET DEFAULT nextval('public.bcfy_calls_quarantine_id_seq'::regclass);

ALTER TABLE ONLY public.bcfy_calls_quarantine
    ADD CONSTRAINT bcfy_calls_quarantine_pkey PRIMARY KEY (id);

CREATE INDEX bcfy_calls_quarantine_created ON public.bcfy_calls_quarantine USING btree (created_at DESC);

-- bcfy_calls_raw --------------------------------------------------------------------------------

CREATE TABLE public.bcfy_calls_raw (
    id bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    playlist_uuid uuid,
    group_id text NOT NULL,
    call_ts bigint NOT NULL,
    started_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone,
    duration_sec double precision,
    url text NOT NULL,
    sid integer,
    site_id integer,
    node_id bigint,
    feed_id integer,
    tg_id integer,
    tag integer,
    freq double precision,
    src bigint,
    descr text,
    display text,
    "grouping" text,
    size_bytes bigint,
    raw jsonb NOT NULL,
    poll_id bigint
);

CREATE SEQUENCE public.bcfy_calls_raw_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.bcfy_calls_raw_id_seq OWNED BY public.bcfy_calls_raw.id;

ALTER TABLE ONLY public.bcfy_calls_raw ALTER COLUMN id SET DEFAULT nextval('public.bcfy_calls_raw_id_seq'::regclass);

ALTER TABLE ONLY public.bcfy_calls_raw
    ADD CONSTRAINT bcfy_calls_raw_pkey PRIMARY KEY (id);

CREATE INDEX bcfy_calls_raw_created ON public.bcfy_calls_raw USING btree (created_at);

CREATE UNIQUE INDEX bcfy_calls_raw_identity ON public.bcfy_calls_raw USING btree (group_id, call_ts, url);

CREATE INDEX bcfy_calls_raw_playlist_started ON public.bcfy_calls_raw USING btree (playlist_uuid, started_at DESC);

CREATE INDEX bcfy_calls_raw_started ON public.bcfy_calls_raw USING btree (started_at DESC);

CREATE TRIGGER call_audio_for_new_calls AFTER INSERT ON public.bcfy_calls_raw REFERENCING NEW TABLE AS new_calls FOR EACH STATEMENT EXECUTE FUNCTION public.call_audio_for_new_calls();

-- bcfy_counties ---------------------------------------------------------------------------------

CREATE TABLE public.bcfy_counties (
    county_id integer NOT NULL,
    state_id integer,
    name text,
    raw jsonb DEFAULT '{}'::jsonb NOT NULL,
    fetched_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY public.bcfy_counties
    ADD CONSTRAINT bcfy_counties_pkey PRIMARY KEY (county_id);

CREATE INDEX bcfy_counties_state ON public.bcfy_counties USING btree (state_id);

-- bcfy_countries --------------------------------------------------------------------------------

CREATE TABLE public.bcfy_countries (
    country_id integer NOT NULL,
    name text,
    code text,
    iso_alpha2 text,
    raw jsonb DEFAULT '{}'::jsonb NOT NULL,
    fetched_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY public.bcfy_countries
    ADD CONSTRAINT bcfy_countries_pkey PRIMARY KEY (country_id);

-- bcfy_playlist_poll_log ------------------------------------------------------------------------

CREATE TABLE public.bcfy_playlist_poll_log (
    id bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    playlist_uuid uuid NOT NULL,
    poll_started_at timestamp with time zone NOT NULL,
    poll_ended_at timestamp with time zone,
    mode text DEFAULT 'pos'::text NOT NULL,
    pos_sent bigint,
    last_pos bigint,
    server_time bigint,
    group_id text,
    window_start bigint,
    window_end bigint,
    success boolean DEFAULT false NOT NULL,
    calls_received integer DEFAULT 0 NOT NULL,
    calls_new integer DEFAULT 0 NOT NULL,
    calls_duplicate integer DEFAULT 0 NOT NULL,
    calls_quarantined integer DEFAULT 0 NOT NULL,
    http_status integer,
    error text,
    CONSTRAINT bcfy_playlist_poll_log_mode_check CHECK ((mode = ANY (ARRAY['init'::text, 'pos'::text, 'backfill'::text])))
);

CREATE SEQUENCE public.bcfy_playlist_poll_log_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.bcfy_playlist_poll_log_id_seq OWNED BY public.bcfy_playlist_poll_log.id;

ALTER TABLE ONLY public.bcfy_playlist_poll_log ALTER COLUMN id SET DEFAULT nextval('public.bcfy_playlist_poll_log_id_seq'::regclass);

ALTER TABLE ONLY public.bcfy_playlist_poll_log
    ADD CONSTRAINT bcfy_playlist_poll_log_pkey PRIMARY KEY (id);

CREATE INDEX bcfy_playlist_poll_log_playlist ON public.bcfy_playlist_poll_log USING btree (playlist_uuid, poll_started_at DESC);

CREATE INDEX bcfy_playlist_poll_log_started ON public.bcfy_playlist_poll_log USING btree (poll_started_at DESC);

-- bcfy_playlists --------------------------------------------------------------------------------

CREATE TABLE public.bcfy_playlists (
    uuid uuid NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    name text,
    descr text,
    groups jsonb DEFAULT '[]'::jsonb NOT NULL,
    ctids integer[] DEFAULT '{}'::integer[] NOT NULL,
    public boolean,
    raw jsonb,
    sync boolean DEFAULT true NOT NULL,
    cursor_pos bigint,
    last_polled_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT bcfy_playlists_cursor_pos_check CHECK ((cursor_pos > 0))
);

ALTER TABLE ONLY public.bcfy_playlists
    ADD CONSTRAINT bcfy_playlists_pkey PRIMARY KEY (uuid);

-- bcfy_backfill ---------------------------------------------------------------------------------

CREATE TABLE public.bcfy_backfill (
    id bigint NOT NULL,
    playlist_uuid uuid NOT NULL,
    group_id text NOT NULL,
    next_ts bigint NOT NULL,
    until_ts bigint NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT bcfy_backfill_check CHECK ((next_ts <= until_ts))
);

CREATE SEQUENCE public.bcfy_backfill_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.bcfy_backfill_id_seq OWNED BY public.bcfy_backfill.id;

ALTER TABLE ONLY public.bcfy_backfill ALTER COLUMN id SET DEFAULT nextval('public.bcfy_backfill_id_seq'::regclass);

ALTER TABLE ONLY public.bcfy_backfill
    ADD CONSTRAINT bcfy_backfill_pkey PRIMARY KEY (id);

CREATE INDEX bcfy_backfill_next ON public.bcfy_backfill USING btree (next_ts);

CREATE INDEX bcfy_backfill_playlist ON public.bcfy_backfill USING btree (playlist_uuid);

ALTER TABLE ONLY public.bcfy_backfill
    ADD CONSTRAINT bcfy_backfill_playlist_uuid_fkey FOREIGN KEY (playlist_uuid) REFERENCES public.bcfy_playlists(uuid) ON DELETE CASCADE;

-- bcfy_states -----------------------------------------------------------------------------------

CREATE TABLE public.bcfy_states (
    state_id integer NOT NULL,
    country_id integer,
    name text,
    code text,
    raw jsonb DEFAULT '{}'::jsonb NOT NULL,
    fetched_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY public.bcfy_states
    ADD CONSTRAINT bcfy_states_pkey PRIMARY KEY (state_id);

CREATE INDEX bcfy_states_country ON public.bcfy_states USING btree (country_id);

-- call_audio ------------------------------------------------------------------------------------

CREATE TABLE public.call_audio (
    call_id bigint NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    lease_owner text,
    lease_until timestamp with time zone,
    error_code text,
    last_error text,
    original_path text,
    original_bytes bigint,
    original_sha256 text,
    original_codec text,
    prepared_path text,
    prepared_bytes bigint,
    prepared_sha256 text,
    measured_duration_sec double precision,
    ready_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    original_pruned_at timestamp with time zone,
    prepared_pruned_at timestamp with time zone,
    CONSTRAINT call_audio_check1 CHECK (((state <> 'downloading'::text) OR ((lease_owner IS NOT NULL) AND (lease_until IS NOT NULL)))),
    CONSTRAINT call_audio_ready_has_audio CHECK (((state <> 'ready'::text) OR ((ready_at IS NOT NULL) AND ((prepared_path IS NOT NULL) OR (prepared_pruned_at IS NOT NULL))))),
    CONSTRAINT call_audio_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'downloading'::text, 'ready'::text, 'failed'::text])))
);

ALTER TABLE ONLY public.call_audio
    ADD CONSTRAINT call_audio_pkey PRIMARY KEY (call_id);

CREATE INDEX call_audio_due ON public.call_audio USING btree (next_attempt_at, call_id) WHERE (state = ANY (ARRAY['pending'::text, 'downloading'::text]));

CREATE INDEX call_audio_failed ON public.call_audio USING btree (updated_at) WHERE (state = 'failed'::text);

CREATE INDEX call_audio_leased ON public.call_audio USING btree (lease_until) WHERE (state = 'downloading'::text);

CREATE INDEX call_audio_original_kept ON public.call_audio USING btree (ready_at) WHERE ((state = 'ready'::text) AND (original_path IS NOT NULL));

CREATE INDEX call_audio_prepared_kept ON public.call_audio USING btree (ready_at) WHERE ((state = 'ready'::text) AND (prepared_path IS NOT NULL));

CREATE INDEX call_audio_ready ON public.call_audio USING btree (ready_at) WHERE (state = 'ready'::text);

ALTER TABLE ONLY public.call_audio
    ADD CONSTRAINT call_audio_call_id_fkey FOREIGN KEY (call_id) REFERENCES public.bcfy_calls_raw(id) ON DELETE CASCADE;

CREATE TRIGGER call_transcription_on_ready_insert AFTER INSERT ON public.call_audio FOR EACH ROW WHEN ((new.state = 'ready'::text)) EXECUTE FUNCTION public.call_transcription_for_ready_audio();

CREATE TRIGGER call_transcription_on_ready_update AFTER UPDATE OF state ON public.call_audio FOR EACH ROW WHEN (((new.state = 'ready'::text) AND (old.state IS DISTINCT FROM 'ready'::text))) EXECUTE FUNCTION public.call_transcription_for_ready_audio();

-- call_audio_attempts ---------------------------------------------------------------------------

CREATE TABLE public.call_audio_attempts (
    id bigint NOT NULL,
    call_id bigint NOT NULL,
    attempt integer NOT NULL,
    lease_owner text NOT NULL,
    worker text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    ended_at timestamp with time zone,
    outcome text,
    error_code text,
    error text,
    bytes bigint,
    download_ms integer,
    prepare_ms integer,
    CONSTRAINT call_audio_attempts_outcome_check CHECK ((outcome = ANY (ARRAY['ready'::text, 'retry'::text, 'failed'::text, 'lease_lost'::text, 'worker_lost'::text])))
);

CREATE SEQUENCE public.call_audio_attempts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.call_audio_attempts_id_seq OWNED BY public.call_audio_attempts.id;

ALTER TABLE ONLY public.call_audio_attempts ALTER COLUMN id SET DEFAULT nextval('public.call_audio_attempts_id_seq'::regclass);

ALTER TABLE ONLY public.call_audio_attempts
    ADD CONSTRAINT call_audio_attempts_pkey PRIMARY KEY (id);

CREATE INDEX call_audio_attempts_call ON public.call_audio_attempts USING btree (call_id, started_at);

CREATE INDEX call_audio_attempts_started ON public.call_audio_attempts USING btree (started_at DESC);

ALTER TABLE ONLY public.call_audio_attempts
    ADD CONSTRAINT call_audio_attempts_call_id_fkey FOREIGN KEY (call_id) REFERENCES public.call_audio(call_id) ON DELETE CASCADE;

-- call_transcription ----------------------------------------------------------------------------

CREATE TABLE public.call_transcription (
    call_id bigint NOT NULL,
    call_started_at timestamp with time zone NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    due_at timestamp with time zone,
    dispatched_at timestamp with time zone,
    dispatch_count integer DEFAULT 0 NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    claimed_by text,
    claimed_at timestamp with time zone,
    last_error text,
    finished_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT call_transcription_check CHECK (((state = ANY (ARRAY['done'::text, 'failed'::text])) = (due_at IS NULL))),
    CONSTRAINT call_transcription_check1 CHECK (((state <> 'failed'::text) OR (last_error IS NOT NULL))),
    CONSTRAINT call_transcription_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'dispatched'::text, 'running'::text, 'done'::text, 'failed'::text])))
);

ALTER TABLE ONLY public.call_transcription
    ADD CONSTRAINT call_transcription_pkey PRIMARY KEY (call_id);

CREATE INDEX call_transcription_failed ON public.call_transcription USING btree (finished_at DESC) WHERE (state = 'failed'::text);

CREATE INDEX call_transcription_open ON public.call_transcription USING btree (call_started_at, call_id) WHERE (state = ANY (ARRAY['pending'::text, 'dispatched'::text, 'running'::text]));

ALTER TABLE ONLY public.call_transcription
    ADD CONSTRAINT call_transcription_call_id_fkey FOREIGN KEY (call_id) REFERENCES public.bcfy_calls_raw(id) ON DELETE CASCADE;

-- history_checkpoints ---------------------------------------------------------------------------

CREATE TABLE public.history_checkpoints (
    kind text NOT NULL,
    upto timestamp with time zone NOT NULL
);

ALTER TABLE ONLY public.history_checkpoints
    ADD CONSTRAINT history_checkpoints_pkey PRIMARY KEY (kind);

-- history_totals --------------------------------------------------------------------------------

CREATE TABLE public.history_totals (
    kind text NOT NULL,
    label text DEFAULT ''::text NOT NULL,
    outcome text DEFAULT ''::text NOT NULL,
    n bigint DEFAULT 0 NOT NULL
);

ALTER TABLE ONLY public.history_totals
    ADD CONSTRAINT history_totals_pkey PRIMARY KEY (kind, label, outcome);

-- job_runs --------------------------------------------------------------------------------------

CREATE TABLE public.job_runs (
    id bigint NOT NULL,
    job text NOT NULL,
    worker text NOT NULL,
    started_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone NOT NULL,
    outcome text NOT NULL,
    error text,
    CONSTRAINT job_runs_check CHECK ((ended_at >= started_at)),
    CONSTRAINT job_runs_outcome_check CHECK ((outcome = ANY (ARRAY['ok'::text, 'error'::text, 'skipped'::text, 'lost_lock'::text])))
);

CREATE SEQUENCE public.job_runs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.job_runs_id_seq OWNED BY public.job_runs.id;

ALTER TABLE ONLY public.job_runs ALTER COLUMN id SET DEFAULT nextval('public.job_runs_id_seq'::regclass);

ALTER TABLE ONLY public.job_runs
    ADD CONSTRAINT job_runs_pkey PRIMARY KEY (id);

CREATE INDEX job_runs_job_started ON public.job_runs USING btree (job, started_at DESC);

CREATE INDEX job_runs_started ON public.job_runs USING btree (started_at DESC);

-- schema_migrations -----------------------------------------------------------------------------

CREATE TABLE public.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

-- transcripts -----------------------------------------------------------------------------------

CREATE TABLE public.transcripts (
    id bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    call_id bigint NOT NULL,
    text text NOT NULL,
    segments jsonb DEFAULT '[]'::jsonb NOT NULL,
    language text,
    backend text NOT NULL,
    model text NOT NULL,
    confidence real,
    audio_duration_sec double precision,
    processing_sec double precision,
    search tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
    empty_reason text,
    dropped_segments jsonb DEFAULT '[]'::jsonb NOT NULL,
    CONSTRAINT transcripts_confidence_check CHECK (((confidence >= (0)::double precision) AND (confidence <= (1)::double precision))),
    CONSTRAINT transcripts_dropped_segments_check CHECK ((jsonb_typeof(dropped_segments) = 'array'::text)),
    CONSTRAINT transcripts_empty_has_reason CHECK (((text = ''::text) = (empty_reason IS NOT NULL))),
    CONSTRAINT transcripts_empty_reason_check CHECK ((empty_reason = ANY (ARRAY['no_speech'::text, 'dropped'::text]))),
    CONSTRAINT transcripts_segments_check CHECK ((jsonb_typeof(segments) = 'array'::text))
);

CREATE SEQUENCE public.transcripts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.transcripts_id_seq OWNED BY public.transcripts.id;

ALTER TABLE ONLY public.transcripts ALTER COLUMN id SET DEFAULT nextval('public.transcripts_id_seq'::regclass);

ALTER TABLE ONLY public.transcripts
    ADD CONSTRAINT transcripts_one_per_call UNIQUE (call_id);

ALTER TABLE ONLY public.transcripts
    ADD CONSTRAINT transcripts_pkey PRIMARY KEY (id);

CREATE INDEX transcripts_created ON public.transcripts USING btree (created_at DESC);

CREATE INDEX transcripts_search ON public.transcripts USING gin (search);

ALTER TABLE ONLY public.transcripts
    ADD CONSTRAINT transcripts_call_id_fkey FOREIGN KEY (call_id) REFERENCES public.bcfy_calls_raw(id) ON DELETE CASCADE;
