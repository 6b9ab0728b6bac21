# gateway: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GW := $(VENV)/bin/gateway
CONFIG ?= config.toml
# ruff's settings live here: pyproject.toml holds only [build-system].
RUFF_FLAGS := --line-length 100 --target-version py311 --select E,F,W,I,B,UP

.PHONY: install run test lint check-config mock clean \
	install-service reload status logs uninstall-service bench bench-quick bench-redis soak

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,otel]'
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
	  trap 'kill $$MOCK 2>/dev/null || true; wait $$MOCK 2>/dev/null || true' EXIT; \
	  export UPSTREAM_URL=http://127.0.0.1:9090/v1; \
	fi; \
	echo "Open http://127.0.0.1:8080/  (Ctrl-C stops)"; \
	$(GW) serve --config $(CONFIG)

test: install
	$(PY) -m pytest -q

# Gateway vs nginx vs a bare aiohttp relay (tests/bench/floor.py, the framework's own cost) vs
# direct, on loopback: one table, JSON in build/bench.json. bench-quick < 2 min.
# Installs h2load (nghttp2-client) and nginx with apt-get when they are missing.
# Then the Redis backend's added latency per request (p50, p99) beside the memory backend's
# (bench-redis alone; needs redis-server).
bench: install
	$(PY) -m tests.bench.run
	$(PY) -m tests.bench.redis_latency

bench-quick: install
	$(PY) -m tests.bench.run --quick
	$(PY) -m tests.bench.redis_latency --requests 500

bench-redis: install
	$(PY) -m tests.bench.redis_latency

# About ten minutes of mixed traffic with injected upstream faults against a gateway
# subprocess; prints a JSON summary (requests, faults, outcomes, RSS, leaks), exits 1 on a
# failed check. `make test` runs a one-minute version (tests/test_soak.py, SOAK_CI_SECONDS).
SOAK_SECONDS ?= 600
soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m tests.soak.driver

lint: install
	$(VENV)/bin/ruff check $(RUFF_FLAGS) gateway tests
	$(VENV)/bin/mypy gateway

check-config: install
	$(GW) check-config --config $(CONFIG)

mock: install
	$(GW) mock-upstream --port 9090

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# ---------------------------------------------------------------------------- ops
# The service under systemd behind nginx, on Debian, as root (README: "Running as a service").
# DESTDIR stages the files elsewhere without touching systemd or nginx (the tests use it).
PREFIX ?= /opt/gateway
ETC ?= /etc/gateway
UNIT_DIR ?= /etc/systemd/system
NGINX_DIR ?= /etc/nginx
SERVICE_PYTHON ?= python3
SERVICE_VENV ?= $(SERVICE_PYTHON) -m venv
# How the package goes into the service's venv (the tests stage files without building it).
SERVICE_PIP ?= $(DESTDIR)$(PREFIX)/venv/bin/pip install -q .
SYSTEMCTL ?= systemctl
SGW := $(PREFIX)/venv/bin/gateway
GW_URL ?= http://127.0.0.1:8080

install-service:
	@test -n "$(DESTDIR)" || test "$$(id -u)" = 0 || { echo "install-service: run as root"; exit 1; }
	$(SERVICE_VENV) $(DESTDIR)$(PREFIX)/venv
	$(SERVICE_PIP)
	install -d -m 0755 $(DESTDIR)$(ETC)
	@# Never overwrite the operator's config or secrets.
	test -e $(DESTDIR)$(ETC)/config.toml || install -m 0644 config.toml $(DESTDIR)$(ETC)/config.toml
	test -e $(DESTDIR)$(ETC)/gateway.env || install -m 0600 systemd/gateway.env $(DESTDIR)$(ETC)/gateway.env
	install -D -m 0644 systemd/gateway.service $(DESTDIR)$(UNIT_DIR)/gateway.service
	install -D -m 0644 systemd/nginx-gateway.conf $(DESTDIR)$(NGINX_DIR)/sites-available/gateway
	install -d -m 0755 $(DESTDIR)$(NGINX_DIR)/sites-enabled
	ln -sfn ../sites-available/gateway $(DESTDIR)$(NGINX_DIR)/sites-enabled/gateway
	@# Debian's welcome site is the default server on port 80: it would answer instead of us.
	rm -f $(DESTDIR)$(NGINX_DIR)/sites-enabled/default
	@if [ -z "$(DESTDIR)" ]; then set -ex; \
	  $(SGW) check-config --config $(ETC)/config.toml; \
	  nginx -t; \
	  $(SYSTEMCTL) daemon-reload; \
	  $(SYSTEMCTL) enable --now gateway; \
	  $(SYSTEMCTL) reload-or-restart nginx; \
	fi

# Validate the installed config with the service's environment, then SIGHUP: keys, limits,
# CORS and upstreams change without dropping a stream; a bad file is refused and logged.
reload:
	set -a; . $(ETC)/gateway.env; set +a; $(SGW) check-config --config $(ETC)/config.toml
	$(SYSTEMCTL) reload gateway

status:
	-$(SYSTEMCTL) status gateway --no-pager
	@curl -fsS $(GW_URL)/readyz && echo || echo "readyz: not ready"

logs:
	journalctl -u gateway -f -o cat

uninstall-service:
	@test -n "$(DESTDIR)" || test "$$(id -u)" = 0 || { echo "uninstall-service: run as root"; exit 1; }
	@if [ -z "$(DESTDIR)" ]; then $(SYSTEMCTL) disable --now gateway || true; fi
	rm -f $(DESTDIR)$(UNIT_DIR)/gateway.service
	rm -f $(DESTDIR)$(NGINX_DIR)/sites-enabled/gateway $(DESTDIR)$(NGINX_DIR)/sites-available/gateway
	rm -rf $(DESTDIR)$(PREFIX)
	@if [ -z "$(DESTDIR)" ]; then $(SYSTEMCTL) daemon-reload; $(SYSTEMCTL) reload nginx || true; fi
	@echo "Kept $(ETC) (your config and secrets); remove it with: rm -r $(ETC)"
