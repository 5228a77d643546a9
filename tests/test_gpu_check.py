"""The GPU check on a machine without a GPU: the shell script stops at once with exit 2, it passes bash -n and
shellcheck, and bench/gpu_check.py runs every part on tiny CPU shapes (--cpu-smoke) and fills every field.
Also `make train`'s launch defaults (launch/machine_defaults.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_without_cuda_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out)})
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr and not out.exists()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr


def test_gpu_check_script_is_clean_shell() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert shutil.which("shellcheck"), "shellcheck is missing: run .ci/install_slurm.sh (CI installs it)"
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_gpu_check_cpu_smoke_fills_every_field(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    result = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps(result, indent=1)[-4000:] + proc.stderr[-2000:]
    assert result["smoke"] is True
    scan = result["scan"]
    assert scan["passed"] and set(scan["max_rel_error"]) == {"out", "last_state", "du", "ddelta", "dA", "dB", "dC",
                                                             "dD", "dz", "ddelta_bias"}
    train = result["train"]
    assert train["steps"] == 4 and train["backend"] == "gloo" and train["loss_fell"]
    assert train["reload_vs_cpu"]["float32"]["rel_error"] < 1e-6 and train["reload_vs_cpu"]["bfloat16"]["passed"]
    assert train["reload_vs_cpu"]["float32"]["argmax_agreement"] == 1.0
    for length in ("L256", "L512"):
        row = result["throughput"][length]
        for name in ("plain_mamba", "ours_pillars_off", "ours_pillars_on"):
            assert row[name]["tokens_per_s"] > 0
        assert row["ours_off_vs_plain"] > 0 and row["pillars_on_vs_off"] > 0
    longest = result["longest"]
    assert longest["longest_tokens"] == 4096 and set(longest["tried"]) == {"1024", "2048", "4096"}


def test_gpu_check_refuses_unknown_parts_and_missing_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bench/gpu_check.py's main() in this process (its `__main__` is `raise SystemExit(main())`): the same exit
    statuses and messages as the script, without starting Python and importing torch twice more."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--cpu-smoke", "--parts", "scan,bogus", "--workdir", str(tmp_path / "work")])
    assert exit_info.value.code == 2 and "unknown part(s) ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "x.json"), "--workdir", str(tmp_path / "work")]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_machine_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU: 2 ranks and the config's own precision; GPUs: one rank per GPU, bf16 when supported. Each choice names
    a ds_config that agrees with its precision."""
    sys.path.insert(0, str(REPO / "launch"))
    from machine_defaults import machine_defaults

    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.engine import deepspeed_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine_defaults() == ["2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for bf16, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        nproc, *overrides = machine_defaults()
        assert nproc == "1" and f"train.precision={precision}" in overrides
        ds = deepspeed_config(load_train_config(None, ["data.source=stdlib", *overrides]), world_size=1)
        assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["zero_optimization"]["stage"] == 2


def test_cuda_dispatch_checks_the_kernel_signature() -> None:
    """Our CUDA dispatch passes mamba-ssm 2.3.2.post1's exact arguments; a build whose pybind11 signature differs
    (e.g. an extra cu_seqlens) is refused with a message naming the fix, before any call."""
    from types import SimpleNamespace

    from adaptive_mamba.ops.selective_scan import check_cuda_signature

    def ext(n_fwd: int, n_bwd: int) -> SimpleNamespace:
        def fn(n: int, name: str):
            f = lambda *a: None  # noqa: E731
            f.__doc__ = f"{name}(" + ", ".join(f"arg{i}: torch.Tensor" for i in range(n)) + ") -> list[torch.Tensor]\n"
            return f
        return SimpleNamespace(fwd=fn(n_fwd, "fwd"), bwd=fn(n_bwd, "bwd"))

    check_cuda_signature(ext(9, 14))
    with pytest.raises(RuntimeError, match=r"selective_scan_cuda.fwd takes 10 arguments.*mamba-ssm==2.3.2.post1"):
        check_cuda_signature(ext(10, 15))
    with pytest.raises(RuntimeError, match=r"selective_scan_cuda.bwd takes 15 arguments"):
        check_cuda_signature(ext(9, 15))
