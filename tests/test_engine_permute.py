"""In-place permutation of a DeepSpeed engine's parameters through DeepSpeed's public safe_get/safe_set API: the
working copy, the fp32 master and both Adam moments all end up permuted, at ZeRO-0/2/3 in fp32 and ZeRO-2 in bf16
(one gloo rank; the 2-rank runs in test_train_runs.py check the ranks agree after real scan-order refreshes).
Also: parameter counts see the full size of ZeRO-3 partitioned parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptive_mamba.training import distributed
from adaptive_mamba.training.config import load_train_config
from adaptive_mamba.training.engine import build_engine, deepspeed_config, permute_engine_params

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def process_group():
    ctx = distributed.DistContext(master_port=distributed.free_port())
    with pytest.MonkeyPatch.context() as mp:     # what a launcher sets; DeepSpeed reads LOCAL_RANK
        for key, value in {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "MASTER_ADDR": ctx.master_addr,
                           "MASTER_PORT": ctx.master_port}.items():
            mp.setenv(key, str(value))
        distributed.init_distributed(ctx)
        yield
        distributed.shutdown()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def _full(engine, name: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    p = dict(engine.module.named_parameters())[name]
    master = safe_get_full_fp32_param(p)
    if master is None:          # ZeRO-0 fp32: the torch optimizer holds the parameter and its moments
        state = engine.optimizer.state[p]
        return {"master": p.detach().clone(), **{k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}}
    shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
    return {"master": master.reshape(shape).clone(),
            **{k: safe_get_full_optimizer_state(p, k).reshape(shape).clone() for k in ("exp_avg", "exp_avg_sq")}}


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_permutation_moves_master_and_moments(process_group, stage: int, precision: str) -> None:
    torch.manual_seed(0)
    cfg = load_train_config(None, ["data.source=stdlib", f"train.precision={precision}", f"train.zero_stage={stage}",
                                   "optim.lr=1e-2"])
    engine = build_engine(Tiny(), cfg, deepspeed_config(cfg, world_size=1))
    try:
        x = torch.randn(4, 6).to(next(engine.module.parameters()).dtype)
        for _ in range(2):
            engine.backward(engine(x))
            engine.step()
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            loss = float(engine(x))
        before = {n: _full(engine, n) for n in ("a.weight", "a.bias", "b.weight")}
        permute_engine_params(engine, [("a.weight", lambda t: t[perm]), ("a.bias", lambda t: t[perm]),
                                       ("b.weight", lambda t: t[:, perm])])
        after = {n: _full(engine, n) for n in before}
        for name, fn in (("a.weight", lambda t: t[perm]), ("a.bias", lambda t: t[perm]),
                         ("b.weight", lambda t: t[:, perm])):
            for key in ("master", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(after[name][key], fn(before[name][key]), msg=f"{name} {key}")
                assert not torch.equal(after[name][key], before[name][key]), f"{name} {key} did not move"
        with torch.no_grad():               # a permutation of hidden units computes the same function
            assert float(engine(x)) == pytest.approx(loss, rel=1e-2 if precision == "bf16" else 1e-6)
    finally:
        engine.destroy()


def test_parameter_counts_give_full_sizes_of_partitioned_zero3_parameters(process_group) -> None:
    from adaptive_mamba.model import parameter_counts

    cfg = load_train_config(None, ["data.source=stdlib", "train.precision=fp32", "train.zero_stage=3"])
    engine = build_engine(Tiny(), cfg, deepspeed_config(cfg, world_size=1))
    try:
        engine.module.b.bias.requires_grad_(False)
        assert all(p.numel() == 0 for p in engine.module.parameters())          # really partitioned
        assert parameter_counts(engine.module) == (6 * 8 + 8 + 8 * 3, 6 * 8 + 8 + 8 * 3 + 3)
    finally:
        engine.destroy()
