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
	install-service reload restart status logs uninstall-service rolling-restart bench bench-quick bench-redis profile soak

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,otel]'
	touch $@

# Serve config.toml on 127.0.0.1:8080. With no OPENAI_API_KEY, stream from the bundled mock
# upstream so the demo page works at once. Auth stays on: a local demo key is made on first
# start (local/demo.key, never committed) and printed. Both ports are checked first (and
# whatever holds one is named); the gateway is exec'd, so a signal to `make run`'s process
# reaches it, and the mock dies with it.
RUN_PORT ?= 8080
MOCK_PORT ?= 9090
DEMO_KEY ?= local/demo.key
run: install
	@mkdir -p $(dir $(DEMO_KEY)) && chmod 700 $(dir $(DEMO_KEY))
	@test -s $(DEMO_KEY) || (umask 077; $(PY) -c 'from gateway.cli import new_key; print(new_key())' > $(DEMO_KEY))
	@set -euo pipefail; \
	ports=$(RUN_PORT); if [ -z "$${OPENAI_API_KEY:-}" ]; then ports="$$ports $(MOCK_PORT)"; fi; \
	for port in $$ports; do \
	  if ! $(PY) -c 'import socket as S,sys; s=S.socket(); s.setsockopt(S.SOL_SOCKET,S.SO_REUSEADDR,1); s.bind(("127.0.0.1",int(sys.argv[1])))' $$port 2>/dev/null; then \
	    echo "make run: 127.0.0.1:$$port is in use, by:" >&2; \
	    (ss -Hltnp "sport = :$$port" 2>/dev/null || true) >&2; \
	    echo "make run: stop it, or pass RUN_PORT=/MOCK_PORT= (and a CONFIG with that port)" >&2; \
	    exit 1; fi; done; \
	HASH=$$($(PY) -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read().strip()).hexdigest())' $(DEMO_KEY)) || true; \
	[[ "$$HASH" =~ ^[0-9a-f]{64}$$ ]] || { echo "make run: could not hash $(DEMO_KEY)" >&2; exit 1; }; \
	export GATEWAY_DEMO_KEY_SHA256=$$HASH; \
	echo "Demo key (in $(DEMO_KEY), not in git): $$(cat $(DEMO_KEY))"; \
	if [ -z "$${OPENAI_API_KEY:-}" ]; then \
	  echo "OPENAI_API_KEY is not set: streaming from the bundled mock upstream on 127.0.0.1:$(MOCK_PORT)"; \
	  setpriv --pdeathsig TERM -- $(GW) mock-upstream --port $(MOCK_PORT) & \
	  export UPSTREAM_URL=http://127.0.0.1:$(MOCK_PORT)/v1; \
	fi; \
	echo "Open http://127.0.0.1:$(RUN_PORT)/  (Ctrl-C stops)"; \
	exec $(GW) serve --config $(CONFIG)

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

# Where S1's and S4's CPU goes (py-spy samples by component), the gateway beside the bare
# relay, in µs per stream and per request. Needs ptrace (root).
profile: install
	$(PY) -m tests.bench.profile

# About ten minutes of mixed traffic with injected upstream faults against a gateway
# subprocess; prints a JSON summary (requests, faults, outcomes, RSS, leaks), exits 1 on a
# failed check. `make test` runs a one-minute version (tests/test_soak.py, SOAK_CI_SECONDS).
SOAK_SECONDS ?= 600
soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m tests.soak.driver

lint: install
	$(VENV)/bin/ruff check $(RUFF_FLAGS) gateway tests systemd/gatewayctl
	$(VENV)/bin/mypy gateway
	$(VENV)/bin/mypy --strict systemd/gatewayctl

check-config: install
	$(GW) check-config --config $(CONFIG)

mock: install
	$(GW) mock-upstream --port 9090

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# ---------------------------------------------------------------------------- ops
# The service under systemd behind nginx, on Debian, as root (README: "Running as a service";
# docs/operations.md). DESTDIR stages the files elsewhere; then nothing on this machine
# changes unless stand-ins are passed for SYSTEMCTL, NGINX, USERADD and CHGRP (the tests do).
PREFIX ?= /opt/gateway
ETC ?= /etc/gateway
UNIT_DIR ?= /etc/systemd/system
NGINX_DIR ?= /etc/nginx
SERVICE_USER ?= gateway
SERVICE_PYTHON ?= python3
SERVICE_VENV ?= $(SERVICE_PYTHON) -m venv
# How the package goes into a new release's venv: run with $NEW (the venv) in the
# environment and a copy of the sources (outside the checkout) as its last argument.
SERVICE_PIP ?= "$$NEW/bin/pip" install -q
# yes: disable Debian's `default` site (uninstall-service re-enables it).
DISABLE_DEFAULT_SITE ?= no
# Several instances on this machine: INSTANCES=N installs systemd/gateway@.service as
# gateway@BASE_PORT .. gateway@(BASE_PORT+N-1) (the instance name is its port) and a site
# whose upstream block lists them, instead of the one gateway.service. Empty: one unit.
INSTANCES ?=
BASE_PORT ?= 8081
READY_TIMEOUT ?= 60
INSTANCE_PORTS = $(if $(INSTANCES),$(shell seq $(BASE_PORT) $$(( $(BASE_PORT) + $(INSTANCES) - 1 ))))
# Instances running or enabled that this install does not want (fewer instances, or back to
# one unit): stopped and disabled once nginx sends elsewhere.
STOP_LEFTOVERS = for port in $$( { $(SYSTEMCTL) list-units --plain --no-legend --state=active \
	  'gateway@*.service' 2>/dev/null | sed -n 's/^gateway@\([0-9]*\)\.service.*/\1/p'; \
	  echo $(patsubst gateway@%.service,%,$(notdir $(wildcard \
	    $(D)$(UNIT_DIR)/*.wants/gateway@*.service))); } | tr ' ' '\n' | sort -u); do \
	  case " $(INSTANCE_PORTS) " in *" $$port "*) ;; \
	    *) $(SYSTEMCTL) disable --now gateway@$$port || true;; esac; done
# What `events` gets instead of Debian's worker_connections 768 (two connections a stream).
NGINX_WORKER_CONNECTIONS ?= 8192
ifeq ($(DESTDIR),)
SYSTEMCTL ?= systemctl
NGINX ?= nginx
USERADD ?= useradd
CHGRP ?= chgrp
CHECK_USER ?= $(SERVICE_USER)
else
SYSTEMCTL ?= true
NGINX ?= true
USERADD ?= true
CHGRP ?= true
CHECK_USER ?=
endif
JOURNALCTL ?= journalctl
CTL = SYSTEMCTL='$(SYSTEMCTL)' JOURNALCTL='$(JOURNALCTL)' $(PYTHON) systemd/gatewayctl
SGW := $(PREFIX)/venv/bin/gateway
GW_URL ?= http://127.0.0.1:8080
D := $(DESTDIR)
NG := $(D)$(NGINX_DIR)
SITE_FILES := $(NG)/sites-available/gateway $(NG)/gateway/proxy.conf
SITE_CHECK := $(foreach f,$(SITE_FILES),--site $(f))
# Every file install-service changes under /etc/nginx: saved before the first change and put
# back (or removed, when it did not exist) if `nginx -t` refuses the result.
NGINX_FILES := $(SITE_FILES) $(NG)/modules-enabled/90-gateway-limits.conf $(NG)/nginx.conf \
	$(NG)/sites-enabled/gateway $(NG)/sites-enabled/default $(NG)/gateway/local.conf \
	$(NG)/gateway/default-site-was-enabled
ROOT_ONLY = @test -n "$(DESTDIR)" || test "$$(id -u)" = 0 || { echo "$@: run as root"; exit 1; }

# Install or upgrade. A new release's venv is built beside the running one and checked (config
# as the service's user with its env file, `nginx -t` with the new site) before anything the
# service uses changes; any failure leaves the old release, site and unit in place. Then the
# `venv` symlink switches and the service restarts (the old instance drains first).
install-service:
	$(ROOT_ONLY)
	@set -euo pipefail; umask 022; \
	getent passwd $(SERVICE_USER) >/dev/null || $(USERADD) --system --user-group \
	  --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(SERVICE_USER); \
	install -d -m 0755 $(D)$(PREFIX)/releases; \
	export NEW=$(D)$(PREFIX)/releases/$$(date +%Y%m%dT%H%M%S)-$$$$; \
	SRC=$$(mktemp -d); \
	fail() { echo "install-service: $$1; the installed service is unchanged" >&2; \
	  rm -rf "$$NEW" "$$SRC"; restore_site; exit 1; }; \
	NGINX_SAVED=; \
	restore_site() { test -n "$$NGINX_SAVED" || return 0; i=0; for f in $(NGINX_FILES); do \
	  i=$$((i + 1)); if [ -e "$$NGINX_SAVED/$$i" ] || [ -L "$$NGINX_SAVED/$$i" ]; then \
	  mv -fT "$$NGINX_SAVED/$$i" "$$f"; else rm -f "$$f"; fi; done; rm -rf "$$NGINX_SAVED"; }; \
	echo "install-service: building $$NEW"; \
	cp -r gateway setup.cfg pyproject.toml README.md "$$SRC"/; \
	$(SERVICE_VENV) "$$NEW" || fail "venv failed"; \
	$(SERVICE_PIP) "$$SRC" || fail "pip failed"; \
	rm -rf "$$SRC"; \
	: "Config and secrets: installed once, never overwritten, never loosened."; \
	if [ ! -d $(D)$(ETC) ]; then install -d -m 0750 $(D)$(ETC); $(CHGRP) $(SERVICE_USER) $(D)$(ETC); fi; \
	if [ ! -e $(D)$(ETC)/config.toml ]; then \
	  install -m 0640 config.toml $(D)$(ETC)/config.toml; $(CHGRP) $(SERVICE_USER) $(D)$(ETC)/config.toml; \
	else chmod o-rwx $(D)$(ETC)/config.toml; \
	  if [ "$$(stat -c %g $(D)$(ETC)/config.toml)" = 0 ]; then $(CHGRP) $(SERVICE_USER) $(D)$(ETC)/config.toml; fi; \
	  if [ "$$(stat -c %g $(D)$(ETC))" = 0 ]; then $(CHGRP) $(SERVICE_USER) $(D)$(ETC); fi; \
	  chmod o-rwx $(D)$(ETC); fi; \
	test -e $(D)$(ETC)/gateway.env || install -m 0600 systemd/gateway.env $(D)$(ETC)/gateway.env; \
	chmod o-rwx $(D)$(ETC)/gateway.env; \
	: "The site: as shipped, or with one upstream server line per instance."; \
	SITE_SRC=$$(mktemp); trap 'rm -f "$$SITE_SRC"' EXIT; \
	if [ -n "$(INSTANCES)" ]; then \
	  test "$(INSTANCES)" -ge 1 2>/dev/null || fail "INSTANCES=N needs N >= 1"; \
	  $(PYTHON) systemd/gatewayctl site --ports "$(INSTANCE_PORTS)" \
	    < systemd/nginx-gateway.conf > "$$SITE_SRC" || fail "site generation failed"; \
	  PORTS_CHECK="--ports $$(echo $(INSTANCE_PORTS) | tr ' ' ,)"; \
	else cp systemd/nginx-gateway.conf "$$SITE_SRC"; PORTS_CHECK=; fi; \
	$(CTL) check --gateway "$$NEW/bin/gateway" --config $(D)$(ETC)/config.toml \
	  --env-file $(D)$(ETC)/gateway.env --user '$(CHECK_USER)' $$PORTS_CHECK \
	  --site "$$SITE_SRC" --site systemd/nginx-proxy.conf || fail "check failed"; \
	: "nginx: our site and snippet are replaced (what was there kept aside, outside nginx's"; \
	: "include globs, until nginx -t passes); the operator's local.conf (TLS, names, public"; \
	: "listeners) is installed once."; \
	install -d -m 0755 $(NG)/gateway $(NG)/sites-available $(NG)/sites-enabled $(NG)/modules-enabled; \
	SAVE=$$(mktemp -d); trap 'rm -f "$$SITE_SRC"; rm -rf "$$SAVE"' EXIT; i=0; for f in $(NGINX_FILES); do i=$$((i + 1)); \
	  if [ -e "$$f" ] || [ -L "$$f" ]; then cp -P -p "$$f" "$$SAVE/$$i"; fi; done; \
	NGINX_SAVED=$$SAVE; \
	install -m 0644 systemd/nginx-proxy.conf $(NG)/gateway/proxy.conf; \
	install -m 0644 "$$SITE_SRC" $(NG)/sites-available/gateway; \
	test -e $(NG)/gateway/local.conf || install -m 0644 systemd/nginx-local.conf $(NG)/gateway/local.conf; \
	install -m 0644 systemd/nginx-limits.conf $(NG)/modules-enabled/90-gateway-limits.conf; \
	if [ -f $(NG)/nginx.conf ]; then sed -i -E \
	  's/^(\s*)worker_connections\s+768;\s*$$/\1worker_connections $(NGINX_WORKER_CONNECTIONS); # gateway: was 768/' \
	  $(NG)/nginx.conf; fi; \
	ln -sfn ../sites-available/gateway $(NG)/sites-enabled/gateway; \
	if [ "$(DISABLE_DEFAULT_SITE)" = yes ] && [ -L $(NG)/sites-enabled/default ]; then \
	  readlink $(NG)/sites-enabled/default > $(NG)/gateway/default-site-was-enabled; \
	  rm $(NG)/sites-enabled/default; fi; \
	$(NGINX) -t || fail "nginx -t failed with the new site"; \
	rm -rf "$$NGINX_SAVED"; NGINX_SAVED=; \
	: "Switch: the venv symlink (an old-style venv directory becomes a release)."; \
	if [ -d $(D)$(PREFIX)/venv ] && [ ! -L $(D)$(PREFIX)/venv ]; then \
	  mv $(D)$(PREFIX)/venv $(D)$(PREFIX)/releases/legacy-$$$$; fi; \
	ln -sfn "releases/$${NEW##*/}" $(D)$(PREFIX)/venv.new; \
	mv -T $(D)$(PREFIX)/venv.new $(D)$(PREFIX)/venv; \
	if [ -n "$(INSTANCES)" ]; then \
	  install -D -m 0644 systemd/gateway@.service $(D)$(UNIT_DIR)/gateway@.service; \
	  $(SYSTEMCTL) daemon-reload; \
	  if [ -e $(D)$(UNIT_DIR)/gateway.service ]; then \
	    $(SYSTEMCTL) disable --now gateway.service || true; rm -f $(D)$(UNIT_DIR)/gateway.service; fi; \
	  for port in $(INSTANCE_PORTS); do $(SYSTEMCTL) enable gateway@$$port; done; \
	  $(SYSTEMCTL) reload-or-restart nginx; \
	  $(STOP_LEFTOVERS); \
	  $(MAKE) -s rolling-restart RUNNING_PORTS="$(INSTANCE_PORTS)" SYSTEMCTL='$(SYSTEMCTL)' \
	    READY_CHECK='$(if $(D),true,)' || exit 1; \
	else \
	  install -D -m 0644 systemd/gateway.service $(D)$(UNIT_DIR)/gateway.service; \
	  $(SYSTEMCTL) daemon-reload; \
	  $(SYSTEMCTL) enable gateway; \
	  $(SYSTEMCTL) restart gateway; \
	  $(SYSTEMCTL) reload-or-restart nginx; \
	  $(STOP_LEFTOVERS); \
	  if [ -e $(D)$(UNIT_DIR)/gateway@.service ]; then \
	    rm -f $(D)$(UNIT_DIR)/gateway@.service; $(SYSTEMCTL) daemon-reload; fi; \
	fi; \
	: "Keep the new release and the one before it (to go back by hand)."; \
	ls -1dt $(D)$(PREFIX)/releases/*/ | tail -n +3 | xargs -r rm -rf; \
	echo "install-service: $$NEW is live"

# The env file parsed as systemd does (no shell), the config checked as the service's user,
# then SIGHUP, then the gateway's own verdict: exit 1 if any process logged reload_failed.
reload:
	$(CTL) reload --config $(ETC)/config.toml --env-file $(ETC)/gateway.env \
	  --gateway $(SGW) --user '$(CHECK_USER)' $(SITE_CHECK)

# Check first: a config that would not start never takes the running service down.
restart:
	$(CTL) restart --config $(ETC)/config.toml --env-file $(ETC)/gateway.env \
	  --gateway $(SGW) --user '$(CHECK_USER)' $(SITE_CHECK)

status:
	-$(SYSTEMCTL) status gateway --no-pager
	@curl -fsS $(GW_URL)/readyz && echo || echo "readyz: not ready"

logs:
	journalctl -u gateway -f -o cat

# Removes exactly what install-service made; keeps $(ETC) and the operator's nginx local.conf.
uninstall-service:
	$(ROOT_ONLY)
	@set -eu; \
	$(SYSTEMCTL) disable --now gateway || true; \
	for port in $(RUNNING_PORTS); do $(SYSTEMCTL) disable --now gateway@$$port || true; done; \
	rm -f $(D)$(UNIT_DIR)/gateway.service $(D)$(UNIT_DIR)/gateway@.service; \
	rm -rf $(D)$(UNIT_DIR)/gateway.service.d $(D)$(UNIT_DIR)/gateway@.service.d; \
	rm -rf $(D)$(PREFIX)/releases; \
	if [ -L $(D)$(PREFIX)/venv ]; then rm -f $(D)$(PREFIX)/venv; \
	elif [ -f $(D)$(PREFIX)/venv/pyvenv.cfg ]; then rm -rf $(D)$(PREFIX)/venv; fi; \
	rmdir $(D)$(PREFIX) 2>/dev/null || true; \
	if [ "$$(readlink $(NG)/sites-enabled/gateway 2>/dev/null)" = ../sites-available/gateway ]; then \
	  rm -f $(NG)/sites-enabled/gateway; fi; \
	rm -f $(NG)/sites-available/gateway $(NG)/gateway/proxy.conf \
	  $(NG)/modules-enabled/90-gateway-limits.conf; \
	if [ -f $(NG)/nginx.conf ]; then sed -i -E \
	  's/^(\s*)worker_connections\s+[0-9]+; # gateway: was 768$$/\1worker_connections 768;/' \
	  $(NG)/nginx.conf; fi; \
	if [ -f $(NG)/gateway/default-site-was-enabled ]; then \
	  ln -sfn "$$(cat $(NG)/gateway/default-site-was-enabled)" $(NG)/sites-enabled/default; \
	  rm -f $(NG)/gateway/default-site-was-enabled; fi; \
	$(SYSTEMCTL) daemon-reload; \
	$(SYSTEMCTL) reset-failed gateway 'gateway@*' || true; \
	$(SYSTEMCTL) reload nginx || true; \
	echo "Kept $(ETC) (config, secrets) and $(NGINX_DIR)/gateway/local.conf (yours);"; \
	echo "remove them with: rm -r $(ETC) $(NGINX_DIR)/gateway; userdel $(SERVICE_USER)"

# ------------------------------------------------------------------ several instances
# The gateway@ instances one at a time: `systemctl restart` sends SIGTERM (the instance drains:
# /readyz 503, listener closed, streams and detached generations finish within shutdown_grace;
# nginx passes what reaches it meanwhile to the others), then /readyz must answer 200 before
# the next instance is touched; it stops at one that is not ready within READY_TIMEOUT.
# RUNNING_PORTS: the active gateway@ instances (or INSTANCES/BASE_PORT, or give it).
RUNNING_PORTS ?= $(if $(INSTANCES),$(INSTANCE_PORTS),$(shell $(SYSTEMCTL) list-units --plain \
	--no-legend --state=active 'gateway@*.service' 2>/dev/null | sed -n 's/^gateway@\([0-9]*\)\.service.*/\1/p'))
READY_CHECK ?=
rolling-restart:
	@ports="$(RUNNING_PORTS)"; test -n "$$ports" || { echo "rolling-restart: no gateway@ instance"; exit 1; }; \
	for port in $$ports; do \
	  echo "restarting gateway@$$port"; \
	  $(SYSTEMCTL) restart gateway@$$port || exit 1; \
	  if [ -n "$(READY_CHECK)" ]; then continue; fi; \
	  deadline=$$(( $$(date +%s) + $(READY_TIMEOUT) )); \
	  until curl -fsS -o /dev/null http://127.0.0.1:$$port/readyz; do \
	    if [ $$(date +%s) -ge $$deadline ]; then \
	      echo "gateway@$$port not ready after $(READY_TIMEOUT) s: stopping the rolling restart"; exit 1; \
	    fi; sleep 0.2; \
	  done; \
	  echo "gateway@$$port ready"; \
	done
