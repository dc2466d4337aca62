# Two entry points, both usable on a fresh machine with only python3:
#   make demo   train a small residual CNN twice (short fixed warmup, adaptive warmup) with the
#               monitor, write TensorBoard logs and a report (the first run needs PyPI access)
#   make test   lint, type-check and run the test suite
#   make docs-images   docs/report*.png and docs/tb_plugin.png from the runs of `make demo` (and two more arms)
# Both create (or reuse) the virtual environment in .venv.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
# The CPU build of torch; installed before the package so that its `torch>=` range is satisfied.
TORCH   ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test lint venv clean docs-images

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo: one configuration of benchmarks/adaptive_warmup.py (a residual CNN, SGD with
# momentum at a peak lr of 0.2, a 10-step warmup, seed 0: the short warmup kills it), trained
# side by side with the short fixed warmup and with adaptive warmup (the defaults), then one
# report that overlays the two runs (runs/demo/report/report.png).
demo: $(STAMP)
	$(PY) benchmarks/adaptive_warmup.py --demo $(DEMO_DIR)

docs-images: $(STAMP)
	$(PY) docs/make_images.py $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .mypy_cache .ruff_cache
