# gateway: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GW := $(VENV)/bin/gateway
CONFIG ?= config.toml
# ruff's settings live here: pyproject.toml holds only [build-system].
RUFF_FLAGS := --line-length 100 --target-version py311 --select E,F,W,I,B,UP

.PHONY: install run test lint check-config mock clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

# Serve config.toml on 127.0.0.1:8080. With no OPENAI_API_KEY, stream from the bundled mock
# upstream so the demo page works at once. Auth stays on: a local demo key is made on first
# start (local/demo.key, never committed) and printed.
run: install
	@mkdir -p local && chmod 700 local
	@test -s local/demo.key || (umask 077; $(PY) -c 'from gateway.cli import new_key; print(new_key())' > local/demo.key)
	@set -e; KEY=$$(cat local/demo.key); \
	export GATEWAY_DEMO_KEY_SHA256=$$(printf %s "$$KEY" | sha256sum | cut -d' ' -f1); \
	echo "Demo key (in local/demo.key, not in git): $$KEY"; \
	if [ -z "$${OPENAI_API_KEY:-}" ]; then \
	  echo "OPENAI_API_KEY is not set: streaming from the bundled mock upstream on 127.0.0.1:9090"; \
	  $(GW) mock-upstream --port 9090 & MOCK=$$!; \
	  trap 'kill $$MOCK 2>/dev/null; wait $$MOCK 2>/dev/null || true' EXIT; \
	  export UPSTREAM_URL=http://127.0.0.1:9090/v1; \
	fi; \
	echo "Open http://127.0.0.1:8080/  (Ctrl-C stops)"; \
	$(GW) serve --config $(CONFIG)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check $(RUFF_FLAGS) gateway tests
	$(VENV)/bin/mypy gateway

check-config: install
	$(GW) check-config --config $(CONFIG)

mock: install
	$(GW) mock-upstream --port 9090

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
