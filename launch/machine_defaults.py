"""Print `make train`'s launch defaults for this machine: the process count, then train.py overrides.

    python launch/machine_defaults.py        # e.g. "2" on a CPU machine, "8 train.precision=bf16 train.zero_stage=2"

GPU machine: one process per GPU, bf16 (ZeRO-2) when every GPU supports it. CPU machine: 2 gloo ranks and the
config's own settings (configs/demo.yaml: ZeRO-2, fp32), so `make train` behaves as it always did there.
"""
from __future__ import annotations

import torch


def machine_defaults() -> list[str]:
    """[nproc, key=value, ...] for this machine."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return ["2"]
    if torch.cuda.is_bf16_supported():
        return [str(torch.cuda.device_count()), "train.precision=bf16", "train.zero_stage=2"]
    return [str(torch.cuda.device_count()), "train.precision=fp32", "train.zero_stage=2"]


if __name__ == "__main__":
    print(" ".join(machine_defaults()))
