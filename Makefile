# `make run` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench bench-postgres torture clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python app.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy --strict durable.py

test: lint
	$(BIN)/pytest

# DBOS Transact, the comparison of rows 8: installed into the venv for the benchmark
# only (never a dependency of durable.py, nor in requirements.txt); bench.py skips the
# DBOS rows when it is missing.
DBOS_VERSION := 3.4.0
$(BIN)/.dbos-$(DBOS_VERSION): $(BIN)/.installed
	@$(BIN)/pip install --quiet --disable-pip-version-check dbos==$(DBOS_VERSION) && touch $@ \
		|| echo "could not install dbos==$(DBOS_VERSION): the DBOS rows will be skipped"

# The benchmark table (about 3 minutes). wrk drives the HTTP row; it is installed
# here if missing (Debian, as root), else bench.py says so and skips that row. Rows
# 7-8 use the PostgreSQL server at $$DURABLE_BENCH_POSTGRES (default: postgres@127.0.0.1:5432),
# and are skipped when none answers.
bench: $(BIN)/.installed $(BIN)/.dbos-$(DBOS_VERSION)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } \
		|| echo "could not install wrk: the HTTP row will be skipped"
	$(BIN)/python bench.py

# Only the PostgreSQL rows (durable.py against psycopg and DBOS): about 2 minutes.
bench-postgres: $(BIN)/.installed $(BIN)/.dbos-$(DBOS_VERSION)
	$(BIN)/python bench.py --only postgres

# The long fault run: the order service killed -9 KILLS times under a stream of orders.
KILLS ?= 40
torture: $(BIN)/.installed
	$(BIN)/python test_faults.py --kills $(KILLS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.db *.db-wal *.db-shm
