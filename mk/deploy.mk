# Deploy and load-test targets; included from the Makefile (uses its $(PY), $(VENV) and `model`).
#   make system-deps   Debian packages the deploy tests need: docker-compose (validates
#                      deploy/docker-compose.yml), prometheus (promtool + a real server) and
#                      kubectl (renders deploy/k8s with `kubectl kustomize`)
#   make loadtest      bounded headless locust run against the embedded default on loopback;
#                      report in $(LOADTEST_OUT)/report.{md,csv,png}
.PHONY: system-deps loadtest

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

system-deps:
	@command -v docker-compose >/dev/null || ($(SUDO) apt-get update -q && $(APT_INSTALL) docker-compose)
	@(command -v promtool >/dev/null && command -v prometheus >/dev/null) || \
	  ($(SUDO) apt-get update -q && $(APT_INSTALL) prometheus)
	@# kubectl is in the development image (package "kubectl"); Debian's own kubernetes-client is too old
	@# for kustomize components, so where no apt source offers "kubectl" this stops with the reason.
	@command -v kubectl >/dev/null || ($(SUDO) apt-get update -q && $(APT_INSTALL) kubectl) || \
	  (echo "system-deps: install kubectl >= 1.27 (the Kubernetes apt repository's package kubectl)" >&2; exit 1)

LOADTEST_USERS      ?= 8
LOADTEST_SPAWN_RATE ?= 2
LOADTEST_TIME       ?= 60s
LOADTEST_MAX_TOKENS ?= 128
LOADTEST_SLO_TTFT   ?= 2.0
LOADTEST_SLO_TPOT   ?= 0.1
LOADTEST_OUT        ?= loadtest/results
LOADTEST_ARGS       ?=

# Starts `leanserve serve` (embedded default engine) on free loopback ports, waits for /ready, runs
# locust headless (bounded: $(LOADTEST_USERS) users for $(LOADTEST_TIME), in-flight streams get up to
# 60 s to finish), writes the report, and always stops the server. Fails if any request failed.
loadtest: model
	@set -eu; \
	out=$(LOADTEST_OUT); mkdir -p $$out; rm -f $$out/samples.jsonl $$out/locust_*.csv; \
	ports=$$($(PY) -c 'import socket; ss=[socket.socket() for _ in range(2)]; [s.bind(("127.0.0.1", 0)) for s in ss]; print(*[s.getsockname()[1] for s in ss])'); \
	set -- $$ports; port=$$1; engine_port=$$2; url=http://127.0.0.1:$$port; \
	echo "loadtest: starting leanserve serve on $$url (log: $$out/serve.log)"; \
	$(VENV)/bin/leanserve serve --port $$port --engine-port $$engine_port --log-level warning > $$out/serve.log 2>&1 & \
	pid=$$!; trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT INT TERM; \
	ready=; for i in $$(seq 600); do \
	  $(PY) -c "import urllib.request; urllib.request.urlopen('$$url/ready', timeout=2)" 2>/dev/null && { ready=1; break; }; \
	  kill -0 $$pid 2>/dev/null || { tail -40 $$out/serve.log; echo "loadtest: leanserve serve exited"; exit 1; }; \
	  sleep 1; \
	done; \
	[ -n "$$ready" ] || { tail -40 $$out/serve.log; echo "loadtest: not ready within 600 s"; exit 1; }; \
	rc=0; $(VENV)/bin/locust -f loadtest/locustfile.py --headless -u $(LOADTEST_USERS) -r $(LOADTEST_SPAWN_RATE) \
	  -t $(LOADTEST_TIME) --stop-timeout 60 --host $$url --only-summary --csv $$out/locust \
	  --max-tokens $(LOADTEST_MAX_TOKENS) --samples-file $$out/samples.jsonl $(LOADTEST_ARGS) || rc=$$?; \
	$(PY) -m loadtest.report $$out/samples.jsonl --out $$out --slo-ttft $(LOADTEST_SLO_TTFT) \
	  --slo-tpot $(LOADTEST_SLO_TPOT) --fail-on-errors \
	  --title "make loadtest: $(LOADTEST_USERS) users, $(LOADTEST_TIME), max_tokens $(LOADTEST_MAX_TOKENS)" || rc=$$?; \
	exit $$rc
