# `make run` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench bench-postgres torture postgres clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python app.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy --strict durable.py

test: lint postgres
	$(BIN)/pytest

# The [postgres] tests use the server DURABLE_TEST_POSTGRES names (by default the one on
# 127.0.0.1:5432). Where none answers there, this starts a throwaway one (as root: initdb
# refuses root, so it runs as user postgres); it never fails: without a server the
# [postgres] tests are skipped, or fail the run under CI=true.
PGPORT ?= 5432
PGDATA_TMP ?= /tmp/durable-postgres-$(PGPORT)
postgres:
	@pg_isready -q -h 127.0.0.1 -p $(PGPORT) 2>/dev/null \
	|| { bin=$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1); \
	     [ -n "$$bin" ] && [ "$$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 \
	     && rm -rf $(PGDATA_TMP) && install -d -o postgres $(PGDATA_TMP) \
	     && runuser -u postgres -- $$bin/initdb -D $(PGDATA_TMP) -A trust -U postgres >/dev/null \
	     && runuser -u postgres -- $$bin/pg_ctl -D $(PGDATA_TMP) -l $(PGDATA_TMP)/log -w \
	          -o "-c listen_addresses=127.0.0.1 -p $(PGPORT) -k $(PGDATA_TMP)" start >/dev/null \
	     && echo "started a throwaway PostgreSQL on 127.0.0.1:$(PGPORT) ($(PGDATA_TMP))"; } \
	|| echo "no PostgreSQL on 127.0.0.1:$(PGPORT): the [postgres] tests will be skipped"

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
bench: $(BIN)/.installed $(BIN)/.dbos-$(DBOS_VERSION) postgres
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } \
		|| echo "could not install wrk: the HTTP row will be skipped"
	$(BIN)/python bench.py

# Only the PostgreSQL rows (durable.py against psycopg and DBOS): about 2 minutes.
bench-postgres: $(BIN)/.installed $(BIN)/.dbos-$(DBOS_VERSION) postgres
	$(BIN)/python bench.py --only postgres

# The long fault run: the order service killed -9 KILLS times under a stream of orders.
KILLS ?= 40
torture: $(BIN)/.installed postgres
	$(BIN)/python test_faults.py --kills $(KILLS)
	$(BIN)/python test_faults.py --kills $(KILLS) --postgres

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.db *.db-wal *.db-shm
