# Commands for a fresh Debian/Ubuntu machine, as root (README "Quick start"):
#   make run    install everything, then run the paper scenario on embedded defaults
#   make test   run the whole test suite (CI)
#   make check  the edit-test loop: every test that needs no root, docker, broker, browser or GPU
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TESTBED := $(VENV)/bin/testbed
# The tiny model's typefaces (testbed/diffusion/fonts.py): its training data, then its judge's held-out faces
FONT_PACKAGES := fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-freefont-ttf fonts-urw-base35 \
	fonts-go fonts-cantarell fonts-linuxlibertine fonts-comic-neue fonts-humor-sans fonts-dkg-handwriting
SYSTEM_PACKAGES := python3 python3-venv python3-dev build-essential mosquitto mosquitto-clients \
	iperf3 iproute2 iptables ethtool tmux iputils-ping chromium chromium-driver \
	docker-registry $(FONT_PACKAGES)
# Python 3.11 is the floor; the pinned torch CPU wheel is for 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: run test check install system venv clean-runs

run: install
	$(TESTBED) run topologies/paper.yaml --out out/paper

# The docker tests need a daemon: as root, .ci/start-dockerd installs docker.io if missing and
# starts dockerd with the address plan (docs/design.md) unless one already answers; it stays up
# afterwards (`.ci/stop-dockerd` stops the one it started).
# Two passes: the pure tests (no root, docker, broker, browser or GPU) on every core
# (pytest-xdist), then the system tiers one test at a time (they share the host's
# namespaces, cgroups and daemon, and the leftover check needs a quiet host). Each test is
# cut off after 15 min (pytest-timeout, pyproject.toml); the slowest are listed.
PURE_MARKERS := not root and not docker and not mosquitto and not browser and not gpu
test: install
	@if [ "$$(id -u)" = 0 ]; then .ci/start-dockerd; fi
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n auto --durations=10 -m "$(PURE_MARKERS)"
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=25 -m "not ($(PURE_MARKERS))"

# The fast tier (pytest markers, tests/conftest.py): pure code, loopback only, no root,
# docker, mosquitto, browser or GPU, and nothing marked slow; no system packages needed;
# on every core (pytest-xdist). TESTBED_TEST_TIMES=FILE records each test's CPU seconds.
CHECK_MARKERS := not root and not docker and not mosquitto and not browser and not gpu and not slow
check: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n auto -m "$(CHECK_MARKERS)"

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
