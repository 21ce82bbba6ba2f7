# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CKSUM := $(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(CKSUM)
TEST_STAMP := $(VENV)/.installed-test-$(CKSUM)
PYTEST_ARGS ?=

.PHONY: install lint test test-fast demo demo-keypoints bench clean

DEMO_DIR ?= outputs/demo
KEYPOINTS_DIR ?= outputs/keypoints

# The package and its runtime dependencies (what `make demo` needs).
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	rm -f $(VENV)/.installed-[0-9]*
	touch $(STAMP)

# Plus the test extras (pytest; torch and torchvision for the side-by-side checks).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-test-*
	touch $(TEST_STAMP)

install: $(STAMP)

# Line length (100) and pyflakes' checks, import order (settings in setup.cfg); a few seconds.
lint: $(TEST_STAMP)
	$(PY) -m flake8 .
	$(PY) -m isort --check-only --diff --settings-path setup.cfg .

# Installs what the tests need (torch/torchvision are test-only), lints, runs the whole suite.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Skips the slow and side-by-side tests.
test-fast: lint
	$(PY) -m pytest -m "not slow and not reference" $(PYTEST_ARGS)

# The main job: generate + build the synthetic shapes data, train configs/shapes.py on the CPU,
# evaluate on the held-out split, write pictures and curves (see README for time and outputs).
demo: $(STAMP)
	$(PY) train.py --config configs/shapes.py --workdir $(DEMO_DIR)
	$(PY) eval.py --config configs/shapes.py --workdir $(DEMO_DIR) --num_pictures 8
	$(PY) -m maskrcnn_jax.evaluation.curves $(DEMO_DIR)

# The keypoint demo: Keypoint R-CNN on synthetic stick figures (configs/keypoints_shapes.py), box
# and OKS keypoint AP on the held-out split, pictures with skeletons and curves.
demo-keypoints: $(STAMP)
	$(PY) train.py --config configs/keypoints_shapes.py --workdir $(KEYPOINTS_DIR)
	$(PY) eval.py --config configs/keypoints_shapes.py --workdir $(KEYPOINTS_DIR) --num_pictures 8
	$(PY) -m maskrcnn_jax.evaluation.curves $(KEYPOINTS_DIR)

bench: $(TEST_STAMP)
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_roi_align.py
	$(PY) benchmarks/bench_family.py

clean:
	rm -rf $(VENV) build *.egg-info
