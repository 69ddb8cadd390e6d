# `make run` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint torture clean

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

# The long fault run: the order service killed -9 KILLS times under a stream of orders.
KILLS ?= 40
torture: $(BIN)/.installed
	$(BIN)/python test_faults.py --kills $(KILLS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.db *.db-wal *.db-shm
