# Two commands to start with:  make run   (the whole pipeline here)   make test   (the test suite)
# Pool sizes and types come from the environment (see .env.example), e.g.
#   AUDIO_CONCURRENCY=4 make worker-audio      or      make worker-audio AUDIO_CONCURRENCY=4

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
COMPOSE ?= docker compose
PYTEST_ARGS ?=

# Overrides given on the make command line reach the processes as environment variables.
export INGEST_POOL INGEST_CONCURRENCY AUDIO_POOL AUDIO_CONCURRENCY \
       TRANSCRIPTION_POOL TRANSCRIPTION_CONCURRENCY NOTIFY_POOL NOTIFY_CONCURRENCY LOG_LEVEL


.PHONY: install run test lint bench migrate schema beat flower metrics status worker-ingest worker-audio \
        worker-transcription worker-notify up down logs deploy test-containers clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,whisper]'
	@touch $@

install: $(VENV)/.installed

run: install                       ## the whole pipeline on this machine; Ctrl-C stops it
	$(BIN)/bcfy run

test: install                      ## the test suite (starts Redis/PostgreSQL if none answer)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install                      ## ruff (rules and format) and mypy (pyproject's [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install                     ## benchmarks; results land in bench/results/
	$(BIN)/python bench/locks.py
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/transcribe.py
	$(BIN)/python bench/audio.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/hosts.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/status.py
	$(BIN)/python bench/alerts.py

migrate: install
	$(BIN)/bcfy migrate

schema: install                    ## rewrite sql/schema.sql from a scratch database, migrated
	$(BIN)/bcfy schema

beat: install                      ## exactly one per deployment
	$(BIN)/bcfy beat

flower: install                    ## needs FLOWER_BASIC_AUTH=user:password outside demo mode
	$(BIN)/bcfy flower

metrics: install                   ## the pipeline's Prometheus metrics on :9108/metrics
	$(BIN)/bcfy metrics

status: install
	$(BIN)/bcfy status

worker-ingest: install             ## polling, transcription dispatch, geo refresh
	$(BIN)/bcfy worker ingest

worker-audio: install              ## downloads and audio preparation
	$(BIN)/bcfy worker audio

worker-transcription: install      ## speech recognition (one process per CPU by default)
	$(BIN)/bcfy worker transcription

worker-notify: install             ## keyword alerts: notifications, the outbox's sweep
	$(BIN)/bcfy worker notify

# --- containers (compose.yaml) ------------------------------------------------------------
.env:
	cp .env.example .env
	@echo "made .env from .env.example: set POSTGRES_PASSWORD, REDIS_PASSWORD, FLOWER_BASIC_AUTH,"
	@echo "AUDIO_S3_ACCESS_KEY_ID, AUDIO_S3_SECRET_ACCESS_KEY (the object store's login) and the keys"

up: .env
	$(COMPOSE) up -d --build

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow --tail=200

# Migrate first, then replace beat, the workers and Flower one service at a time. A stopped
# worker finishes its running tasks (warm shutdown, up to stop_grace_period); queued messages
# wait in Redis for the new one.
deploy: .env
	$(COMPOSE) build
	$(COMPOSE) up -d redis postgres seaweedfs
	$(COMPOSE) run --rm migrate
	for svc in worker-ingest worker-audio worker-transcription worker-notify beat flower metrics; do \
	  $(COMPOSE) up -d --no-deps $$svc || exit 1; \
	done

# The compose deployment started for real, here, with Podman (tests/containers/test_stack.py):
# builds the images, `make up` in demo mode, then checks health, users, the first transcript,
# Flower's login, `make deploy` while calls flow, and `make down` + `make up`. Needs root,
# podman, docker-compose and mmdebstrap; removes every container and volume it made.
test-containers: install
	BCFY_TEST_CONTAINERS=1 $(BIN)/python -m pytest -p no:cacheprovider -s tests/containers $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
