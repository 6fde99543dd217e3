# The two commands: `make run` and `make test`. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: run test lint typecheck bench deps dev-deps clean worker beat

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3

# Stamps: reinstall only when a requirements file changes.
$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(VENV)/.deps $@

deps: $(VENV)/.deps
dev-deps: $(VENV)/.dev-deps

## run: install, migrate the embedded SQLite database, seed the demo, serve.
run: deps
	HOST="$(HOST)" PORT="$(PORT)" scripts/run.sh

## worker, beat: Celery beside the web processes. They need a broker shared
## with the web (REDIS_URL): the embedded default runs tasks in the web process.
worker beat: deps
	@if [ -z "$$REDIS_URL$$CELERY_BROKER_URL" ]; then \
	  echo "make $@: set REDIS_URL (or CELERY_BROKER_URL) to the web processes' Redis;" \
	  "without one, make run already runs every task in its own process." >&2; exit 2; fi
	$(BIN)/celery -A gateway_project $@ --loglevel=INFO

## test: lint and typecheck, then the whole suite against throwaway PostgreSQL and Redis.
test: export SECRET_KEY := make-test-only-secret-key-never-used-in-production
test: export GATEWAY_ADMIN_KEY := make-test-admin-key
test: dev-deps
	$(BIN)/ruff check .
	$(BIN)/mypy .
	scripts/with-services.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev-deps
	$(BIN)/mypy .

## bench: the gateway against the upstream called directly, a bare pass-through
## and the LiteLLM proxy, one worker each on its own core (bench/README.md).
bench: deps
	PYTHON="$(PYTHON)" bench/run.sh

clean:
	rm -rf $(VENV) var staticfiles .pytest_cache .ruff_cache .mypy_cache
