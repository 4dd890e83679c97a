# `make run` starts the whole suite locally; `make test` sets up everything and runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
BUF := node_modules/.bin/buf

.PHONY: run test deps redis protos descriptor lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the project's range admits it, so pip won't fetch another build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

redis:
	@command -v redis-server >/dev/null || { \
	  echo "redis-server not found; installing Debian's redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

deps: $(STAMP) $(BUF) redis
	$(PY) tools/gen_protos.py --deps-only

protos: $(STAMP)
	$(PY) tools/gen_protos.py

descriptor: $(STAMP)
	$(PY) tools/gen_protos.py --descriptor-out k8s/kiln.pb

run: $(STAMP) redis
	$(VENV)/bin/kiln up

lint: deps
	$(VENV)/bin/ruff check .
	$(BUF) lint

typecheck: deps
	$(VENV)/bin/mypy

test: deps lint typecheck
	$(PY) -m pytest

bench: deps
	$(PY) bench/e2e_latency.py
	$(PY) bench/admission.py
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) node_modules .build .kiln
