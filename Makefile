# The command surface of the project: a person and CI run the same targets.
# The interpreter: the first Python 3.11+ with venv among the official image's, the
# distribution's and the one on PATH. Those two are built with profile-guided and link-time
# optimization and run the proxy about 18% faster than a plain source build (pyenv's
# default). PYTHON=... chooses another.
PYTHON ?= $(or $(shell for p in /usr/local/bin/python3 /usr/bin/python3 python3; do \
  "$$p" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
  >/dev/null 2>&1 && { echo "$$p"; break; }; done),python3)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: run test native lint typecheck check bench bench-peers bench-picking bench-routing bench-soak clean system-deps

# Runtime install: the package, and mypy to compile its data plane.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[native]'
	touch $@

# Development install: the package with test and lint tools.
$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,native]'
	touch $@ $(VENV)/.installed

## native: compile the data plane with mypyc into .native/ (nothing to do when it is fresh).
## Without a C compiler the proxy runs as pure Python, the same behaviour at more CPU.
native: $(VENV)/.installed
	$(PY) -m lb.native_build build || echo "lb: no compiled build (see above); running as pure Python"

## run: three simulated model servers and the proxy on config.yaml (Ctrl-C stops all)
run: $(VENV)/.installed native
	$(PY) -m backends.demo --config config.yaml

## test: the whole suite, from nothing: on the compiled build (what make run and the image
## run), then on pure Python (what runs where nothing can be compiled)
test: $(VENV)/.installed-dev system-deps native
	$(PY) -m pytest
	LB_NATIVE=0 $(PY) -m pytest -p no:cacheprovider

# Tools some tests drive for real: promtool (Debian's prometheus) and headless Chromium.
SYSTEM_TOOLS := promtool:prometheus chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "the tests need:$$missing (as root: apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

check: lint typecheck test

## bench: proxy against direct-to-backend, results in benchmarks/results/
bench: $(VENV)/.installed-dev native
	$(PY) -m benchmarks.bench

## bench-peers: lb beside nginx, HAProxy, vllm-router, sglang-router and LiteLLM (installs them)
bench-peers: $(VENV)/.installed-dev native
	$(PY) -m pip install -q matplotlib
	$(PY) -m benchmarks.peers

## bench-routing: strategies and peer routers on a simulated fleet (shared prefixes, slow replica)
bench-routing: $(VENV)/.installed-dev native
	$(PY) -m benchmarks.routing

## bench-picking: cost of one pick per strategy from 2 to 1,000 backends
bench-picking: $(VENV)/.installed-dev native
	$(PY) -m benchmarks.picking

## bench-soak: proxy memory per 1,000 idle open streams, and its trend over a 10-minute soak
bench-soak: $(VENV)/.installed-dev native
	$(PY) -m benchmarks.soak

clean:
	rm -rf $(VENV) .native .pytest_cache .mypy_cache .ruff_cache *.egg-info
