# spoa-mp developer entry points. `make test` works on a fresh Debian machine
# (as root, or with sudo): it installs the system packages and the virtualenv
# it needs, then runs every test.

# Debian's own python3 when there is one: it is built with PGO and LTO, and
# runs the workers' Python 20-40% faster here than a plain source build that
# may come first on PATH. PYTHON=... picks another.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV ?= .venv
BIN := $(VENV)/bin
RUN_PACKAGES := gcc python3-venv python3-dev
TEST_PACKAGES := clang libclang-rt-14-dev haproxy wrk prometheus redis-server openssl
FUZZ_SECONDS ?= 60
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench deps deps-run venv clean

# The default job: the IP-reputation agent on 127.0.0.1:12345, one worker per
# CPU, in the foreground (Ctrl-C stops it). Pass flags with ARGS="-n 2 -d".
run: deps-run venv
	$(BIN)/spoa-mp $(ARGS)

test: deps venv lint
	SPOA_MP_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/bench_codec.py

# System packages, installed when missing: a C compiler, venv and headers for
# Debian's python3 (to build and run); for the tests also clang with the
# libFuzzer and sanitizer runtimes, HAProxy (2.6 on Debian 12) and Prometheus
# (promtool and the server the metrics tests scrape with).
deps-run:
	@$(call apt_install,$(RUN_PACKAGES))

deps: deps-run
	@$(call apt_install,$(TEST_PACKAGES))

define apt_install
missing=""; for p in $(1); do \
  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  echo "installing:$$missing"; \
  $(SUDO) apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
fi
endef

# The virtualenv with an editable install (the cffi module is built in-tree);
# rebuilt when the C codec or the packaging changes.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py build_ffi.py $(wildcard csrc/*.c csrc/*.h)
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf build dist *.egg-info spoa_mp/_spop.c spoa_mp/_spop*.so .pytest_cache
