# kubefly: `make up` runs the platform, `make test` runs every test tier.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
PYTEST    := $(VENV)/bin/pytest
KUBEFLY   := $(VENV)/bin/kubefly
CACHE     ?= $(HOME)/.cache/kubefly
TOOLS_BIN := $(CACHE)/bin
export KUBEFLY_CACHE := $(CACHE)
export PATH := $(TOOLS_BIN):$(PATH)

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# ---- setup ---------------------------------------------------------------
.PHONY: os-deps tools venv
os-deps: ## install the Debian packages the tests need (hack/os-packages.txt)
	@bash hack/install-os-deps.sh

tools: ## build the pinned Kubernetes binaries from the Go module proxy (cached)
	@bash hack/build-tools.sh >/dev/null

venv: $(VENV)/.installed ## the Python virtualenv with kubefly and its test extras
$(VENV)/.installed: pyproject.toml
	@test -d $(VENV) || python3 -m venv $(VENV)
	@$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

# ---- code generation -----------------------------------------------------
.PHONY: crds
crds: venv ## regenerate crds/ and the chart's CRD templates from the pydantic models
	@$(KUBEFLY) crds generate --out crds

# ---- tests ---------------------------------------------------------------
# pytest's exit 5 (no tests collected) fails here: every tier must run something.
PYTEST_RUN = $(PYTEST) -p no:cacheprovider -q -rfE

.PHONY: test test-unit test-component test-cluster
test: os-deps tools venv ## run every test tier (unit, component, cluster, kind)
	@$(PYTEST_RUN) operator/tests e2e

test-unit: venv ## unit tests only
	@$(PYTEST_RUN) operator/tests/unit

test-component: os-deps venv ## component tests: real processes on loopback
	@$(PYTEST_RUN) operator/tests/component

test-cluster: os-deps tools venv ## cluster tests on the local control plane (kwok)
	@$(PYTEST_RUN) e2e --ignore=e2e/kind

# ---- the local cluster and the platform ----------------------------------
.PHONY: cluster-up cluster-down up down
cluster-up: tools venv ## start the local control plane with kind-config.yaml's hosts; prints the kubeconfig path last
	@$(PY) -m kubefly.devcluster up

cluster-down: venv ## stop the local control plane
	@$(PY) -m kubefly.devcluster down

up: os-deps tools venv ## run the platform: cluster, CRDs, chart, operator
	@bash hack/up.sh

down: venv ## stop the platform started by `make up`
	@bash hack/down.sh

# ---- kind: real pods on real kubelets (Docker) ------------------------------
.PHONY: kind-up kind-down kind-images test-kind
kind-up: tools venv ## kind-config.yaml's cluster on Docker, kubefly installed by Helm from its images; prints the kubeconfig path last
	@bash hack/kind/up.sh

kind-down: ## delete the kind cluster (cached images stay)
	@bash hack/kind/down.sh

kind-images: ## build the kind node image and kubefly's images without a registry (cached)
	@bash hack/kind/docker.sh && bash hack/kind/node-image.sh && bash hack/kind/kubefly-images.sh

test-kind: venv ## the kind tier only (builds what it needs, deletes its cluster after)
	@$(PYTEST_RUN) e2e/kind

# ---- benchmarks (figures in bench/results/*.json, not committed) ---------
.PHONY: bench-gossip bench-proxy bench-failover bench-backup bench-machines bench-volumes soak
bench-gossip: venv ## gossip propagation latency at 20/50/100 agents
	@$(PY) bench/gossip.py
bench-proxy: os-deps venv ## kubefly proxy vs nginx: throughput and overload
	@$(PY) bench/proxy.py
bench-failover: os-deps venv ## Postgres primary kills under write load
	@$(PY) bench/failover.py
bench-backup: os-deps venv ## Postgres: 1 GiB base backup, archive lag, PITR restore, RPO, switchover gap: bench/results/backup.json
	@$(PY) bench/backup.py
bench-machines: tools venv ## 1,000 machines on the local control plane
	@$(PY) bench/machines.py
bench-volumes: tools venv ## 1 GiB snapshot, incremental, restore on another host, migrate, drain of 25 machines (5 with volumes), on kind: bench/results/volumes.json
	@$(PY) bench/volumes.py $(BENCH_ARGS)
soak: tools venv ## random faults under traffic on kind for 15 min (SOAK_ARGS='--duration 300 --seed 2'): bench/results/soak.json
	@$(PY) bench/soak.py $(SOAK_ARGS)
