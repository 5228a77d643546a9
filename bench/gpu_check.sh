#!/usr/bin/env bash
# The GPU check, in one command on a machine with one CUDA GPU (H200-class: about 8 minutes in all):
#   (a) load mamba-ssm + causal-conv1d, or build them for sm_90 from the source tarballs in .gpu/
#       (../shared/gpu/README.md), and install deepspeed from its wheel in .gpu/ when it is missing;
#   (b) pytest -m gpu;  (c)-(f) bench/gpu_check.py: CUDA scan vs reference, 50 steps of the 130M shape under NCCL
#       + ZeRO-2 bf16 with all pillars and a CPU reload, tokens/s and peak memory vs plain Mamba, longest sequence.
# Writes gpu_check.json (GPU_CHECK_OUT) and logs under .cache/gpu_check/. Exit: 0 all passed, 1 a part failed,
# 2 no CUDA device (or no kernels and nothing to build them from).
#   bash bench/gpu_check.sh            # or: make gpu-check; GPU_CHECK_PARTS=scan,train runs a subset of (c)-(f)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu_check.json}
GPU_DIR=${GPU_DIR:-.gpu}
SITE=/tmp/site                      # where build_mamba_kernels.sh installs the kernels
LOGS=.cache/gpu_check
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }

if ! cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null); then
  echo "gpu_check: $PY cannot import torch: set PYTHON to the interpreter that has it" >&2
  exit 2
fi
if [ "$cuda" != 1 ]; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False on this machine): run it on a GPU machine;" \
       "'python bench/gpu_check.py --cpu-smoke' checks the script on the CPU" >&2
  exit 2
fi
mkdir -p "$LOGS"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

# (a) kernels: already importable (installed, or built earlier into $SITE), else build them from .gpu/
kernels_ok() { "$PY" -c "import selective_scan_cuda, causal_conv1d_cuda" 2>/dev/null; }
if kernels_ok; then
  echo "gpu_check: mamba-ssm and causal-conv1d kernels found ($(elapsed))"
else
  build=$GPU_DIR/build_mamba_kernels.sh
  [ -f "$build" ] || build=../shared/gpu/build_mamba_kernels.sh
  if ! ls "$GPU_DIR"/mamba_ssm-*.tar.gz "$GPU_DIR"/causal_conv1d-*.tar.gz >/dev/null 2>&1 || [ ! -f "$build" ]; then
    echo "gpu_check: the kernels are not installed and $GPU_DIR/ lacks the source tarballs or the build script:" \
         "prepare $GPU_DIR/ as ../shared/gpu/README.md says" >&2
    exit 2
  fi
  echo "gpu_check: building the kernels for sm_90 (several minutes; log: $LOGS/kernels.log)"
  bash "$build" "$GPU_DIR" > "$LOGS/kernels.log" 2>&1
  cp /tmp/kbuild/*.log "$LOGS/" 2>/dev/null
  if ! kernels_ok; then
    echo "gpu_check: the kernel build failed after $(elapsed); see $LOGS/kernels.log, $LOGS/ms.log, $LOGS/cc.log" >&2
    exit 1
  fi
  echo "gpu_check: kernels built ($(elapsed))"
fi

# deepspeed (not on the GPU machine): its wheel from .gpu/, with any missing pure-python dependency found there
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  for pkg in deepspeed hjson py-cpuinfo; do
    mod=${pkg/py-cpuinfo/cpuinfo}
    "$PY" -c "import $mod" >/dev/null 2>&1 && continue
    "$PY" -m pip install -q --no-deps --no-index --find-links "$GPU_DIR" --target "$SITE" "$pkg" \
      >> "$LOGS/deepspeed.log" 2>&1 || { echo "gpu_check: no $pkg wheel in $GPU_DIR/ (pip wheel --no-deps" \
                                              "deepspeed hjson py-cpuinfo -w $GPU_DIR)" >&2; exit 2; }
  done
  if ! "$PY" -c "import deepspeed" >> "$LOGS/deepspeed.log" 2>&1; then
    echo "gpu_check: deepspeed does not import; see $LOGS/deepspeed.log" >&2
    exit 2
  fi
  echo "gpu_check: deepspeed installed into $SITE ($(elapsed))"
fi

# (b) the GPU tests
status=0
if "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$LOGS/pytest_gpu.log" 2>&1; then
  pytest_ok=true
else
  pytest_ok=false; status=1
fi
echo "gpu_check: pytest -m gpu: $(tail -n 1 "$LOGS/pytest_gpu.log") ($(elapsed))"

# (c)-(f)
"$PY" bench/gpu_check.py --out "$OUT" ${GPU_CHECK_PARTS:+--parts "$GPU_CHECK_PARTS"} || status=1
"$PY" - "$OUT" "$pytest_ok" "$LOGS/pytest_gpu.log" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
path, ok, log, seconds = sys.argv[1], sys.argv[2] == "true", sys.argv[3], int(sys.argv[4])
result = json.load(open(path))
result["pytest_gpu"] = {"passed": ok, "summary": open(log).read().strip().splitlines()[-1:]}
result["total_seconds"] = seconds
json.dump(result, open(path, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k in ("device", "pytest_gpu", "total_seconds")}))
EOF
echo "gpu_check: wrote $OUT after $(elapsed), exit $status"
exit $status
