# mailq — `make help` lists the targets.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in parallel, each worker with its own PostgreSQL and Redis; the suite waits on
# sockets and timers far more than it computes, so 4 workers help even on 2 cores.
TEST_WORKERS ?= 4
MUTATE_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test mutate lint fmt clean-local

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install mailq with its dev and benchmark tools

# `make run PORT=8081 SMTP_PORT=2525` moves the API and the SMTP sink (`mailq dev --port, --smtp-port`).
# Only from make's command line: a PORT in the environment is often meant for something else.
PORT_ARG = $(if $(filter command line,$(origin PORT)), --port $(PORT))
SMTP_PORT_ARG = $(if $(filter command line,$(origin SMTP_PORT)), --smtp-port $(SMTP_PORT))

run: $(STAMP) ## start the whole service on embedded PostgreSQL, Redis and an SMTP sink (PORT=, SMTP_PORT=)
	$(BIN)/mailq dev$(PORT_ARG)$(SMTP_PORT_ARG)

test: $(STAMP) ## run the whole test suite (real PostgreSQL, Redis and SMTP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

mutate: $(STAMP) ## break each design invariant in a scratch copy; its tests must fail (MUTATE_ARGS='-k name')
	$(BIN)/python -m tests.mutate $(MUTATE_ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-local: ## remove the local data directory (.mailq/) — embedded databases and dev secrets
	rm -rf .mailq

-include deployment/k8s.mk
-include tests/bench/bench.mk
-include tests/chaos/chaos.mk
