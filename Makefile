# Two commands for a fresh Debian/Ubuntu machine, as root (README "Quick start"):
#   make run    install everything, then run the paper scenario on embedded defaults
#   make test   run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TESTBED := $(VENV)/bin/testbed
SYSTEM_PACKAGES := python3 python3-venv python3-dev build-essential mosquitto mosquitto-clients \
	iperf3 iproute2 iptables ethtool tmux iputils-ping chromium chromium-driver docker-registry
# Python 3.11 is the floor; the pinned torch CPU wheel is for 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: run test install system venv clean-runs

run: install
	$(TESTBED) run topologies/paper.yaml --out out/paper

# The docker tests need a daemon: as root, .ci/start-dockerd installs docker.io if missing and
# starts dockerd with the address plan (docs/design.md) unless one already answers; it stays up
# afterwards (`.ci/stop-dockerd` stops the one it started).
test: install
	@if [ "$$(id -u)" = 0 ]; then .ci/start-dockerd; fi
	$(VENV)/bin/python -m pytest -q

install: system venv

system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  fi; \
	  systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	  systemctl disable --now docker-registry >/dev/null 2>&1 || true; \
	else echo "not root or no apt-get: install $(SYSTEM_PACKAGES) yourself"; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test,sd15]'
	touch $@
