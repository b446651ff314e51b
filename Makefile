# Every target works from a fresh clone; `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ADDRESS ?= 127.0.0.1:50051
DATABASE_URL ?= sqlite:///enrollment.db
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install proto lint test migrate run clean

# target: help - list the targets and what they do
help:
	@grep -E '^# target: ' $(MAKEFILE_LIST) | sed 's/^# target: /  /'

# target: install - create .venv and install the project with its dev extras
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# target: proto - regenerate messages, gRPC stubs and .pyi stubs from protos/
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# target: lint - ruff, buf lint, buf format, and a check that generated code is current
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/python scripts/gen_protos.py --check

# target: test - lint, then the whole pytest suite against real servers
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

# target: migrate - apply pending migrations to DATABASE_URL (default sqlite:///enrollment.db)
migrate: $(STAMP)
	$(BIN)/enrollment-server migrate --database-url '$(DATABASE_URL)'

# target: run - migrate, then serve on ADDRESS (default 127.0.0.1:50051)
run: migrate
	$(BIN)/enrollment-server serve --address '$(ADDRESS)' --database-url '$(DATABASE_URL)'

# target: clean - remove .venv, caches and the default SQLite database
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	rm -f enrollment.db enrollment.db-wal enrollment.db-shm
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
