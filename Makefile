# Quick start: `make train` runs the demo, `make test` runs the test suite.
# Both create .venv in the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv test train bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests -q

# The demo: a small Mamba trained from scratch on this Python's standard library sources with all three pillars,
# 2 ranks (CPU/gloo when there is no GPU). Leaves a checkpoint, an offline W&B run and runs/demo/summary.json.
# Override e.g. `make train NPROC=1 TRAIN_ARGS="max_steps=20"`.
NPROC ?= 2
TRAIN_ARGS ?=
train: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		launch/train.py --config configs/demo.yaml $(TRAIN_ARGS)

# CPU benchmarks (minutes; they print the tables of BENCHMARKS.md). Measure on an idle machine.
bench: venv
	$(PY) bench/profile_step.py
	$(PY) bench/bench_model.py --lengths 2048 8192
	$(PY) bench/bench_scan_decision.py
	$(PY) bench/bench_tokenize.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
