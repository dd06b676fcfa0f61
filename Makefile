# Every target creates the virtualenv (.venv) and installs the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: help install migrate run test bench bench-queries bench-instructions bench-smoke lint fmt clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)  ## create .venv and install the project with its dev tools

migrate: $(INSTALLED)  ## apply pending migrations (DATABASE_URL, else the embedded PostgreSQL)
	$(BIN)/xray-ingest migrate

run: $(INSTALLED)  ## serve on 127.0.0.1:8000 (no DATABASE_URL: embedded PostgreSQL in .xray/)
	$(BIN)/xray-ingest serve

test: $(INSTALLED)  ## run the tests (XRAY_TEST_DSN/DATABASE_URL, else a throwaway PostgreSQL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(INSTALLED)  ## ingest vs. the raw COPY ceiling; dedup cost; time until readable; metrics cost
	$(BIN)/python -m benchmarks.bench_ingest $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.bench_dedupe
	$(BIN)/python -m benchmarks.bench_visibility
	$(BIN)/python -m benchmarks.bench_overhead

bench-queries: $(INSTALLED)  ## query latencies on 2M seeded events; what each index costs ingest
	$(BIN)/python -m benchmarks.bench_queries $(BENCH_ARGS)

bench-instructions: $(INSTALLED)  ## the server's instructions per event under callgrind (BENCH_ARGS: --against REF --durable --keep DIR)
	$(BIN)/python -m benchmarks.bench_instructions $(BENCH_ARGS)

bench-smoke: $(INSTALLED)  ## a few seconds of the ingest benchmark
	$(BIN)/python -m benchmarks.bench_ingest --smoke

lint: $(INSTALLED)  ## ruff format --check, ruff check, mypy --strict
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(INSTALLED)  ## format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove the virtualenv and caches (keeps .xray/, the embedded database)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
