# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Installs what the tests need (torch/torchvision are test-only) and runs the whole suite.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Skips the slow and side-by-side tests.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not reference" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_roi_align.py

clean:
	rm -rf $(VENV) build *.egg-info
