# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The first use creates .venv with the tested pins (constraints.txt); later uses
# re-install only when setup.cfg or constraints.txt changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orbitclip-installed
# OpenMP busy-waiting makes shared 2-core machines crawl (see CALIBRATION notes).
export OMP_WAIT_POLICY ?= PASSIVE
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONDONTWRITEBYTECODE := 1
PYTEST_ARGS ?=

.PHONY: setup test demo clean-demo recipes-check

setup: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job on the embedded default: synthetic aerial scenes -> shards -> a tiny CLIP
# trained for a few minutes on CPU (auto-resumes if interrupted) -> zero-shot + retrieval table
# (trained vs random init, both through the eval harness).
demo: $(STAMP)
	test -f runs/demo-shards/manifest.json || \
	  $(PY) -m shards build --source synthetic --output runs/demo-shards --count 2000 --quiet
	$(PY) -m shards inspect runs/demo-shards --grid runs/demo-shards/grid.png
	$(PY) -m train --config configs/demo.yaml
	$(PY) -m eval run --model runs/demo --name demo-trained --model orbit-tiny --name random-init \
	  --benchmark demo --out runs/demo/eval/final --no-progress
	@echo "Contact sheet: runs/demo-shards/grid.png   Confusion matrix: runs/demo/eval/final/"
	@echo "TensorBoard:   $(VENV)/bin/tensorboard --logdir runs/demo/tb"

# Re-run the CPU recipes (400,000 training samples each, ~12-16 min on 2 cores) and fail if a result drops > 2 points below
# configs/recipes/results.json. Not part of `make test`.
recipes-check: $(STAMP)
	$(PY) -m benchmarks.recipes check

clean-demo:
	rm -rf runs/demo runs/demo-shards
