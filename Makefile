# subjax — every target that needs Python depends on the virtualenv, so each
# works on a fresh clone. `make help` lists them.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
# Small-matrix linear algebra (eigh/inv of curvature factors) is faster single-threaded.
export OPENBLAS_NUM_THREADS ?= 1
export JAX_PLATFORMS ?= cpu
FAKE_DEVICES := --xla_force_host_platform_device_count=8
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: help venv test test-fast test-multidevice test-all lint bench bench-publish reproduce \
	readme-tables notebooks notebooks-sync clean

help:
	@echo "make venv            create .venv and install -e .[test,bench] (idempotent)"
	@echo "make test            fast suite, then the multi-device suite on 8 fake CPU devices"
	@echo "make test-all        everything, slow tests included"
	@echo "make lint            ruff, and the text check (no tracker numbers, no outside paths)"
	@echo "make bench           all benchmarks -> results/bench/ (QUICK=1: smaller sizes)"
	@echo "make bench-publish   results/bench/ -> docs/benchmarks/ and the README's table"
	@echo "make reproduce       every reproduction in quick mode -> results/REPORT.md"
	@echo "make reproduce-NAME  one reproduction (quick); FULL=1 for the full protocol"
	@echo "make publish-NAME    after a FULL=1 run: commit-ready summary, figures, README block"
	@echo "make readme-tables   regenerate README results blocks from committed summaries"
	@echo "make notebooks       check every notebook pair and execute it from its .py source"
	@echo "make notebooks-sync  after editing a notebook's .py (or .ipynb), rewrite its pair"
	@echo "make clean           remove results/, caches and the virtualenv"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

test: test-fast test-multidevice

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not multidevice" -n 2 --dist load --doctest-modules tests subjax

test-multidevice: $(STAMP)
	XLA_FLAGS="$(FAKE_DEVICES)" $(PYTEST) -m "multidevice and not slow" -n 2 --dist load

test-all: $(STAMP)
	$(PYTEST) -m "not multidevice"
	XLA_FLAGS="$(FAKE_DEVICES)" $(PYTEST) -m "multidevice"

lint: $(STAMP)
	$(PY) -m ruff check subjax experiments tests .ci
	$(PY) .ci/check_text.py

bench: $(STAMP)
	$(PY) -m experiments.bench $(if $(QUICK),--quick,)

# After `make bench`: commit results/bench/*.json as docs/benchmarks/ and regenerate
# the README's benchmark table from them.
bench-publish: $(STAMP)
	$(PY) -m experiments.bench.headline --results results/bench

reproduce: $(STAMP)
	$(PY) -m experiments reproduce --quick

reproduce-%: $(STAMP)
	$(PY) -m experiments run $* $(if $(FULL),--full,--quick)

publish-%: $(STAMP)
	$(PY) -m experiments publish $*

readme-tables: $(STAMP)
	$(PY) -m experiments readme-tables

notebooks: $(STAMP)
	$(PYTEST) tests/test_notebooks.py

# Each notebook is a jupytext pair: notebooks/NN_name.py (the source) and .ipynb (no outputs).
notebooks-sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

clean:
	rm -rf results .pytest_cache .ruff_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
