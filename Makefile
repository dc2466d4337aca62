# Two entry points, both usable on a fresh machine with only python3:
#   make demo   train the example transformer with the monitor, write TensorBoard logs and a report
#   make test   lint, type-check and run the test suite
# Both create (or reuse) the virtual environment in .venv.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
# The CPU build of torch; installed before the package so that its `torch>=` range is satisfied.
TORCH   ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo: one configuration (a Post-LN character transformer, AdamW at a peak lr of 1e-2, a
# 10-step warmup), trained twice side by side (one core each): with the short fixed warmup, and
# with adaptive warmup and rollback; then one report that overlays the two runs.
DEMO_ARGS ?= --post-ln --lr 1e-2 --warmup-steps 10 --max-steps 250 --d-model 64 --n-layers 2 \
	--n-heads 4 --seq-len 64 --batch-size 16 --max-chars 400000 --val-every 125 --threads 1 \
	--quiet --no-report
latest = $$(ls -d $(DEMO_DIR)/$(1)/version_* | sort -t_ -k2 -n | tail -1)

demo: $(STAMP)
	$(PY) examples/char_transformer.py --log-dir $(DEMO_DIR) --run-name short $(DEMO_ARGS) & \
	$(PY) examples/char_transformer.py --log-dir $(DEMO_DIR) --run-name adaptive $(DEMO_ARGS) \
		--monitor-kwargs '{"adaptive": {"rollback": true}}'; \
	wait
	$(VENV)/bin/warmup-monitor report $(call latest,short) $(call latest,adaptive) \
		--out $(DEMO_DIR)/report

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .mypy_cache .ruff_cache
