# `make run` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench torture clean

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

# The benchmark table (about 3 minutes). wrk drives the HTTP row; it is installed
# here if missing (Debian, as root), else bench.py says so and skips that row.
bench: $(BIN)/.installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } \
		|| echo "could not install wrk: the HTTP row will be skipped"
	$(BIN)/python bench.py

# The long fault run: the order service killed -9 KILLS times under a stream of orders.
KILLS ?= 40
torture: $(BIN)/.installed
	$(BIN)/python test_faults.py --kills $(KILLS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.db *.db-wal *.db-shm
