# meterline — `make help` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install run test test-unit fuzz lint bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,embedded,msk]'
	@touch $(STAMP)

install: $(STAMP) ## create the venv and install meterline with test tools

run: $(STAMP) ## embedded broker + Postgres + all services + load + live view (Ctrl-C stops)
	$(BIN)/meterline dev

test: $(STAMP) ## the whole suite: unit, integration (real broker + Postgres), e2e
	$(BIN)/python -m pytest -q -rs

test-unit: $(STAMP) ## pure tests only (seconds)
	$(BIN)/python -m pytest -q tests/unit

fuzz: $(STAMP) ## fuzz parse_record longer than `make test` does, random seed (see README)
	METERLINE_FUZZ_EXAMPLES=$${METERLINE_FUZZ_EXAMPLES:-100000} METERLINE_FUZZ_SEED=$${METERLINE_FUZZ_SEED:-random} \
		$(BIN)/python -m pytest -q -s tests/unit/core/test_parse_fuzz.py

lint: $(STAMP) ## ruff + mypy
	$(BIN)/ruff check services tests
	$(BIN)/mypy

bench: $(STAMP) ## throughput and latency, end to end; writes bench-results/bench.json
	@mkdir -p bench-results
	$(BIN)/meterline bench --json bench-results/bench.json

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
