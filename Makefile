# Quick start: `make train` runs the demo, `make test` runs the test suite.
# Both create .venv in the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv test train gpu-check bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests -q

# The demo: a small Mamba trained from scratch on this Python's standard library sources with all three pillars.
# Launch defaults fit the machine (launch/machine_defaults.py): one process per GPU with bf16 where supported, or
# 2 CPU ranks on gloo (fp32) without a GPU. Leaves a checkpoint, an offline W&B run and runs/demo/summary.json.
# Override e.g. `make train NPROC=1 TRAIN_ARGS="train.max_steps=20"`.
NPROC ?=
TRAIN_ARGS ?=
train: venv
	set -- $$($(PY) launch/machine_defaults.py) && nproc=$${1:?launch/machine_defaults.py printed nothing} && shift && \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m torch.distributed.run --standalone \
		--nproc_per_node $(or $(NPROC),$$nproc) launch/train.py --config configs/demo.yaml "$$@" $(TRAIN_ARGS)

# On a machine with one CUDA GPU: kernels, GPU tests, scan/training/throughput/longest-sequence checks -> gpu_check.json
# (see BENCHMARKS.md). Exits 2 at once without a CUDA device.
gpu-check: venv
	PYTHON=$(PY) bash bench/gpu_check.sh

# CPU benchmarks: each prints the table of the BENCHMARKS.md section named before it (tens of minutes on 2 cores).
# Measure on an idle machine. The longer ones (bench_finetune, bench_order_pruning, bench_context_parallel, the
# study pilot) are run by hand with the commands in BENCHMARKS.md.
BENCH = echo && echo "== BENCHMARKS.md: $(1)" && $(PY) bench/$(2)
bench: venv
	$(call BENCH,Core model and selective scan,bench_model.py --lengths 2048 8192)
	$(call BENCH,Data preparation,bench_tokenize.py)
	$(call BENCH,Evaluation (generation and scoring),bench_generation.py)
	$(call BENCH,Training (activation checkpointing vs sequence length),bench_train_memory.py)
	$(call BENCH,Pillars (structured masks at evaluation),bench_masks.py --repeats 60)
	$(call BENCH,Pillars (scan order on real text),bench_scan_order.py)
	$(call BENCH,CPU training step (step breakdown),profile_step.py --lengths 2048 8192 --top 12)
	$(call BENCH,Scan-order decision cost and statistics hook,bench_scan_decision.py --strides 1 4 8 16)
	$(call BENCH,Channel-sparse training,bench_channel_sparse.py)

clean:
	rm -rf $(VENV) .cache build *.egg-info
