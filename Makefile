# attestd: every target does its own set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config python3-venv gcc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages proto check test demo bench clean

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

proto: setup
	$(PY) proto/generate.py

check: setup
	$(VENV)/bin/ruff check attestd tests examples bench tpm-sim proto
	$(VENV)/bin/ruff format --check attestd tests examples bench tpm-sim proto
	$(VENV)/bin/mypy

test: setup
	TSS2_LOG=all+none $(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: setup
	TSS2_LOG=all+none PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tpm-sim/demo.sh

# Benchmarks: medians, side by side in one run; results in build/bench.json.
bench: setup
	mkdir -p build
	TSS2_LOG=all+none $(PY) bench/eventlog.py $(if $(QUICK),--quick,)
	TSS2_LOG=all+none $(PY) bench/quote.py $(if $(QUICK),--quick,)
	TSS2_LOG=all+none $(PY) bench/e2e.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache demo-data
