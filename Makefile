# Hivemind rooms: every target sets up what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
PYTEST_ARGS ?=

.PHONY: setup system docker test lint demo bench eval layers synth clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,runner,infra]'
	touch $@

## setup: Python environment and system packages (docker.io, debootstrap, bubblewrap)
setup: $(VENV)/.installed
	@bash scripts/system-deps.sh

## docker: start a Docker engine if none answers and build the agent base image if missing
docker: setup
	@bash agent-runner/deploy/dockerd.sh
	@bash agents/base/build-base-image.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) agent-runner/deploy/app_compose.py check

## test: lint, then the whole suite (unit, integration on a moto server, docker, security, cdk)
test: setup docker lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## demo: the owner -> participant story on the local stack (left running; stop it with: .venv/bin/hmctl dev down)
demo: setup docker
	$(VENV)/bin/hmctl dev demo

## bench: benchmarks in tests/bench (measurements, not tests); results go to docs/performance.md
bench: setup docker
	@status=0; for f in tests/bench/bench_*.py; do echo "== $$f"; $(PY) $$f || status=1; done; exit $$status

## eval: leakage scenarios end to end on the local stack (eval/scenarios); fails on any canary leak
eval: setup docker
	$(PY) eval/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
