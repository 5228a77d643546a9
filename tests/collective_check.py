"""Run launch/train.py with every torch.distributed collective checked against its group's backend.

    python -m torch.distributed.run --nproc_per_node 2 tests/collective_check.py REPORT_DIR [train.py args]

The default group is treated as NCCL (it accepts CUDA tensors only), whatever backend it really has; any other
group accepts what its real backend accepts (gloo: CPU tensors only). Collectives issued by DeepSpeed are not
checked (its tensors live where the model lives: on the GPU under NCCL). A collective from our code that breaks
the rule raises at once, as NCCL would ("No backend type associated with device type cpu"); every checked call is
appended to REPORT_DIR/rank<R>.jsonl so the test can see which groups and devices were used.
"""
from __future__ import annotations

import inspect
import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "gather",
                      "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "barrier", "monitored_barrier")
SKIP_DIRS = (str(Path(torch.__file__).parent / "distributed"), str(Path(__file__)))


def _caller() -> str:
    """File:line of the first frame outside torch.distributed and this checker."""
    for frame in inspect.stack()[2:]:
        if not frame.filename.startswith(SKIP_DIRS):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _wrap(name: str, report: Path):
    original = getattr(dist, name)
    signature = inspect.signature(original)

    def checked(*args, **kwargs):
        caller = _caller()
        if "/deepspeed/" not in caller:
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group")
            default = group is None or group is dist.GroupMember.WORLD
            backend = "nccl (simulated)" if default else dist.get_backend(group)
            devices = sorted({t.device.type for v in bound.arguments.values() for t in _tensors(v)})
            allowed = {"cuda"} if default else {"cpu"} if backend == "gloo" else {"cuda"}
            record = {"op": name, "caller": caller, "backend": backend, "devices": devices}
            with report.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if name in TENSOR_COLLECTIVES and not set(devices) <= allowed:
                raise RuntimeError(f"collective check: {name} from {caller} sends {devices} tensors on a group whose "
                                   f"backend is {backend}, which accepts only {sorted(allowed)} tensors")
        return original(*args, **kwargs)

    return checked


def main() -> None:
    report_dir, train_args = Path(sys.argv[1]), sys.argv[2:]
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / f"rank{os.environ.get('RANK', '0')}.jsonl"
    for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
        setattr(dist, name, _wrap(name, report))
    sys.argv = [str(REPO / "launch" / "train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
