# Every target works from a fresh clone; `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
ADDRESS ?= 127.0.0.1:50051
DATABASE_URL ?= sqlite:///enrollment.db
PYTEST_ARGS ?=
BENCH_ARGS ?=
BULK_ARGS ?= --seconds 5
MIX ?= read
DATABASE ?= postgresql
CHAOS_SECONDS ?= 60
SOAK_SECONDS ?= 600

.DEFAULT_GOAL := help
.PHONY: help install proto lint test interop interop-tools migrate run clean bench bench-rush bench-scale bench-compare bench-micro bench-idle bench-icount bench-profile bench-handoff bench-migrate bench-reset chaos soak bench-import

# target: help - list the targets and what they do
help:
	@grep -E '^# target: ' $(MAKEFILE_LIST) | sed 's/^# target: /  /'

# target: install - create .venv and install the project with its dev extras
install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e './client[progress,tracing]' -e '.[dev]'
	touch $@

# target: proto - regenerate stubs, .pyi, the descriptor set, the googleapis copies and docs/api.md
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# target: lint - ruff, buf lint/format, buf breaking against v1.0, generated code and docs/api.md current, deploy/kubernetes valid, mypy
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/buf breaking --against releases/enrollment-v1.0.binpb
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
	$(BIN)/python scripts/typecheck.py

# target: test - lint, then the whole pytest suite against real servers
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

# target: interop - Node and Go clients against a real server (installs node, Go and npm packages when it can)
interop: $(STAMP) interop-tools
	INTEROP_REQUIRED=1 $(BIN)/pytest -p no:cacheprovider tests/test_interop.py $(PYTEST_ARGS)

# The toolchains of tests/test_interop.py: Debian's Node and Go packages (Go in GOPATH
# mode: grpc, genproto and protobuf as Debian ships them, nothing from a module proxy)
# and the Node client's locked npm packages. apt-get needs root; without it, say so.
# Commands first (a node from elsewhere, with its npm, is fine), then Go source packages.
INTEROP_COMMANDS := node:nodejs npm:npm go:golang-go protoc-gen-go:protoc-gen-go \
	protoc-gen-go-grpc:protoc-gen-go-grpc
INTEROP_GO_DEV := golang-google-grpc-dev golang-google-genproto-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev
NODE_MODULES := tests/interop/node/node_modules/.package-lock.json

.PHONY: interop-apt
interop-tools: interop-apt $(NODE_MODULES)

interop-apt:
	@missing=""; for c in $(INTEROP_COMMANDS); do \
	  command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c#*:}"; \
	done; \
	for p in $(INTEROP_GO_DEV); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } >/dev/null \
	  || echo "could not install$$missing (apt-get needs root and Debian's lists): the interop tests say what is missing"; \
	fi

$(NODE_MODULES): tests/interop/node/package.json tests/interop/node/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: cannot install the Node client's packages"; exit 0; }; \
	cd tests/interop/node && npm ci --no-audit --no-fund --loglevel=error

# target: migrate - apply pending migrations to DATABASE_URL (default sqlite:///enrollment.db)
migrate: $(STAMP)
	ENROLLMENT_DATABASE_URL='$(DATABASE_URL)' $(BIN)/enrollment-server migrate

# target: run - migrate, then serve on ADDRESS (default 127.0.0.1:50051)
run: migrate
	ENROLLMENT_DATABASE_URL='$(DATABASE_URL)' $(BIN)/enrollment-server serve --address '$(ADDRESS)'

# target: bench - the server against bare grpcio ceilings: table, targets, memory, bench/results/*.json; then tracing off vs on, the change feed (delivery latency, the outbox's cost), and bulk loads (a 20,000-row CSV import, single-call p99 during batches of 1000; BULK_ARGS)
bench: $(STAMP) h2load
	$(BIN)/python -m bench run $(BENCH_ARGS)
	$(BIN)/python -m bench tracing $(filter --strict,$(BENCH_ARGS))
	$(BIN)/python -m bench feed $(filter --strict,$(BENCH_ARGS))
	$(BIN)/python -m bench bulk $(BULK_ARGS) $(filter --strict,$(BENCH_ARGS))

# h2load (Debian's nghttp2-client) is the cheap client of the read-h2 rows; where it
# cannot be installed (no root, no apt) bench says so and the aio client drives every mix.
.PHONY: h2load
h2load:
	@command -v h2load >/dev/null 2>&1 || { \
	  echo "h2load is missing: installing nghttp2-client"; \
	  { apt-get install -y -qq nghttp2-client || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }; } >/dev/null 2>&1 \
	  || echo "could not install nghttp2-client: bench runs without h2load"; }

# target: bench-rush - registration rush: 5,000 students x 5 tries at 50 courses (30 seats, waitlist 20), 64 callers, on SQLite and PostgreSQL (--workers 2); throughput vs the write mix, outcomes, exactness
bench-rush: $(STAMP)
	$(BIN)/python -m bench.rush $(BENCH_ARGS)

# target: bench-scale - p99 at 10,000 vs 10,000,000 enrollments, seed time, size on disk, newest migrate time (BENCH_ARGS="--enrollments 1000000" for a quick run)
bench-scale: $(STAMP)
	$(BIN)/python -m bench scale $(BENCH_ARGS)

# target: bench-compare - two bench result files side by side: make bench-compare A=a.json B=b.json
bench-compare: $(STAMP)
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make bench-compare A=old.json B=new.json"; exit 2; }
	$(BIN)/python -m bench compare '$(A)' '$(B)'

# target: bench-idle - CPU per second of an idle server process with 0, 1 and 100 unread WatchEvents streams, on SQLite, PostgreSQL and MariaDB (the database's CPU too)
bench-idle: $(STAMP)
	$(BIN)/python -m bench feed --sections idle --databases sqlite,postgresql,mysql $(BENCH_ARGS)

# target: bench-micro - servicer CPU per call in-process (one thread, no gRPC): steadier than bench
bench-micro: $(STAMP)
	$(BIN)/python -m bench micro $(BENCH_ARGS)

# target: bench-icount - servicer instructions per call in-process (valgrind's callgrind): repeats within ~1%, for changes bench-micro's noise hides
bench-icount: $(STAMP)
	@command -v valgrind >/dev/null 2>&1 || { \
	  echo "valgrind is missing: installing it"; \
	  { apt-get install -y -qq valgrind || { apt-get update -qq && apt-get install -y -qq valgrind; }; } >/dev/null 2>&1 \
	  || echo "could not install valgrind"; }
	$(BIN)/python -m bench icount $(BENCH_ARGS)

# target: bench-handoff - CPU of a PostgreSQL read handed to a pool thread vs driven by the loop (psycopg2's asynchronous connections), in-process, rounds alternating
bench-handoff: $(STAMP)
	$(BIN)/python -m bench handoff $(BENCH_ARGS)

# target: bench-profile - py-spy the server under one mix (MIX=read|write|mixed); top lines (BENCH_ARGS=--threads-cpu: instead, CPU and context switches a call by thread; --write-groups: how many SQLite writes commit together)
bench-profile: $(BENCH_STAMP)
	$(BIN)/python -m bench profile --mix '$(MIX)' $(BENCH_ARGS)

# target: bench-migrate - time `migrate` of the newest migration over 1,000,000 v1.0 enrollments (DATABASE_URL: a new SQLite file or an empty database)
bench-migrate: $(STAMP)
	$(BIN)/python -m bench.migration --database-url '$(DATABASE_URL)' $(BENCH_ARGS)

# target: bench-reset - a rapid-reset flood (HTTP/2 streams opened and reset at once) against another client's calls, and callers at a connection's stream limit with and without the client library's retries
bench-reset: $(STAMP)
	$(BIN)/python -m bench.reset $(BENCH_ARGS)

# target: bench-import - enrollments/s of a 20,000-row CSV import, and single-call p50/p99 alone vs during batches of 1000 (DATABASE_URL: an empty database; default a new SQLite file)
bench-import: $(STAMP)
	$(BIN)/python -m bench bulk $(if $(filter-out sqlite:///enrollment.db,$(DATABASE_URL)),--database-url '$(DATABASE_URL)') $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e './client[progress,tracing]' -e '.[dev,bench]'
	touch $@

# target: chaos - kill the server's database connections every 2 s under writes (DATABASE=postgresql|mysql, CHAOS_SECONDS=60); checks every answer
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos --database '$(DATABASE)' --seconds '$(CHAOS_SECONDS)' $(BENCH_ARGS)

# target: soak - mixed load on a real server for SOAK_SECONDS (600); RSS, descriptors, threads, p99; PASS/FAIL on growth
soak: $(STAMP)
	$(BIN)/python -m bench.soak --seconds '$(SOAK_SECONDS)' $(SOAK_ARGS)

# target: clean - remove .venv, caches and the default SQLite database
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	rm -f enrollment.db enrollment.db-wal enrollment.db-shm
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
