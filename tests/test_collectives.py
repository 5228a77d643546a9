"""Collectives go to a device their group's backend accepts: the real training loop (2 ranks, gloo, ZeRO-2, all
pillars, evals, rank verification, checkpoints) under a checker that treats the default group as NCCL (CUDA tensors
only), so any CPU statistic sent on it fails the run as it would on GPUs. Plus the helper's own contract."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_train_runs import PILLARS, PY, REPO, TINY, _env, _port, data_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_training_collectives_use_a_backend_that_accepts_their_tensors(tmp_path: Path, data_dir: Path) -> None:
    out, report = tmp_path / "run", tmp_path / "report"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "tests/collective_check.py", str(report), f"data.dir={data_dir}", f"train.output_dir={out}",
           "train.zero_stage=2", "train.max_steps=5", "eval.every=2", "train.save_every=2", *TINY,
           *PILLARS]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    assert "scan order refreshed at step 2" in proc.stdout and "PEFT allocation at step 3" in proc.stdout
    for rank in (0, 1):
        calls = [json.loads(line) for line in (report / f"rank{rank}.jsonl").read_text().splitlines()]
        ours = [c for c in calls if "/adaptive_mamba/" in c["caller"]]
        ops = {c["op"] for c in ours}
        # the loss/stop flags, loss sums, scan statistics and importances, decisions, digests and barriers all ran
        assert {"all_reduce", "broadcast_object_list", "all_gather_object", "barrier"} <= ops, ops
        assert sum(c["op"] == "all_reduce" for c in ours) >= 20
        for c in ours:    # the checker raises on a violation; this is what it saw: CPU tensors on gloo only
            if c["devices"]:
                assert c["backend"] == "gloo" and c["devices"] == ["cpu"], c


def test_helpers_in_one_process_are_identity() -> None:
    """Without a process group (or with one rank) the helpers return their input: one code path at any scale."""
    import torch

    from adaptive_mamba.training import distributed

    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    (summed,) = distributed.all_reduce_sum([t])
    assert torch.equal(summed, t) and summed is not t
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object("x") == ["x"]


def test_no_module_calls_torch_distributed_directly() -> None:
    """Only training/distributed.py talks to torch.distributed, so every collective goes through its routing."""
    offenders = []
    for path in sorted((REPO / "adaptive_mamba").rglob("*.py")) + sorted((REPO / "launch").rglob("*.py")):
        if path.name == "distributed.py" and path.parent.name == "training":
            continue
        text = path.read_text()
        if "torch.distributed" in text.replace("torch.distributed.run", ""):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], offenders


def test_cuda_rank_beyond_the_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from adaptive_mamba.training.distributed import DistContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 1 .* 1 GPU"):
        DistContext(rank=1, world_size=2, local_rank=1).device()
