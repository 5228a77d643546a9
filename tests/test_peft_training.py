"""Pillar 3 inside real DeepSpeed training: the Adam state of every parameter that survives a reallocation is
carried to the rebuilt optimizer (2 CPU ranks, ZeRO-2 and ZeRO-3), and the controls reachable from the trainer
config (peft_mode lora / ia3 / full, hybrid without masks) train what they should and nothing else.

The carry-over worker runs under torchrun from this same file (`python -m torch.distributed.run ... THIS_FILE
STAGE`); the control runs go through launch/train.py like a user's."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.test_train_runs import TINY, _env, _port, data_dir, train  # noqa: E402,F401  (data_dir: fixture)

pytestmark = pytest.mark.distributed
TARGETS = ("in_proj", "x_proj", "out_proj")


def _carry_worker(stage: int) -> None:
    """Train 3 steps with LoRA / IA3 / frozen modules, reallocate (merge, keep, add), rebuild the engine the way
    Trainer.rebuild_engine does, and check the moments and steps that arrive in the new optimizer."""
    import torch.distributed as dist

    from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars import AllocationDecision, HybridPeftConfig, MaskConfig, apply_allocation, apply_masks
    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.distributed import DistContext, init_distributed
    from adaptive_mamba.training.engine import (_get_moment, _state_groups, build_engine, canonical_param_name,
                                                deepspeed_config, full_state_dict, load_optimizer_state,
                                                optimizer_state)
    from adaptive_mamba.training.trainer import TrainingObjective

    env = os.environ
    ctx = DistContext(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                      master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))
    init_distributed(ctx)
    cfg = load_train_config(None, ["data.dir=unused", "optim.lr=1e-2", "optim.weight_decay=0.1", "train.batch_size=1",
                                   f"train.zero_stage={stage}"])
    ds = deepspeed_config(cfg, ctx.world_size)
    hcfg = HybridPeftConfig(lora_r=2, target_modules=TARGETS)
    names = [f"blocks.{i}.mixer.{p}" for i in range(2) for p in TARGETS]

    first = AllocationDecision(dict(zip(names, ["lora", "ia3", "frozen", "lora", "ia3", "lora"])),
                               {n: 0.0 for n in names}, step=0)
    second = AllocationDecision(dict(zip(names, ["frozen", "ia3", "lora", "lora", "lora", "frozen"])),
                                {n: 0.0 for n in names}, step=3)

    def build(state=None):
        """The first allocation; with `state` (gathered from the engine): loaded, then reallocated to `second`."""
        torch.manual_seed(0)
        model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=64))
        model.requires_grad_(False)
        apply_masks(model, MaskConfig(block_size=8, targets=TARGETS))
        apply_allocation(model, first, hcfg)
        if state is not None:
            model.load_state_dict(state, strict=True)
            apply_allocation(model, second, hcfg)
        return TrainingObjective(model, lambda m: torch.zeros(()))

    engine = build_engine(build(), cfg, ds)
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(3):
        ids = torch.randint(0, 64, (1, 32), generator=g)
        ce, reg = engine(ids, ids)
        engine.backward(ce + reg)
        engine.step()
    saved = optimizer_state(engine)
    state = {k[len("model."):]: v for k, v in full_state_dict(engine).items() if k.startswith("model.")}
    assert saved["steps"] == {"decay": 3.0, "masks": 3.0}, saved["steps"]   # adapters are 2-D (decay)
    assert all(float(m["exp_avg_sq"].abs().sum()) > 0 for m in saved["moments"].values())
    engine.destroy()
    del engine
    gc.collect()

    new = build_engine(build(state), cfg, ds)
    carried = load_optimizer_state(new, saved)
    survivors = {canonical_param_name(n) for n in carried}
    expected = {n for n, _ in new.module.named_parameters() if canonical_param_name(n) in saved["moments"]}
    # kept adapters (IA3 on x_proj 0, LoRA on in_proj 1) and every mask survive; merged ones are gone, new ones fresh
    assert {canonical_param_name(n) for n in expected} == survivors
    assert "model.blocks.0.mixer.x_proj.ia3_l.ia3" in survivors
    assert "model.blocks.1.mixer.in_proj.lora_A.lora.weight" in survivors
    assert "model.blocks.0.mixer.in_proj.lora_A.lora.weight" not in survivors   # merged away
    assert sum("mask_logits" in n for n in survivors) == len(names)
    base_opt = getattr(new.optimizer, "optimizer", new.optimizer)
    steps = {float(base_opt.state[q]["step"]) for _, tensors in _state_groups(new) for q in tensors}
    assert steps == {3.0}, steps
    fresh = 0
    for name, p in new.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
            value = _get_moment(p, key).reshape(shape).cpu()
            old = saved["moments"].get(canonical_param_name(name))
            if old is None:
                assert float(value.abs().sum()) == 0.0, name
                fresh += 1
            else:
                assert torch.equal(value, old[key]), f"{name} {key} not carried"
    assert fresh > 0
    ids = torch.randint(0, 64, (1, 32), generator=g)
    ce, reg = new(ids, ids)
    new.backward(ce + reg)
    new.step()
    assert torch.isfinite(ce)
    new.destroy()
    del new
    gc.collect()
    dist.barrier()
    if ctx.is_main:
        print("CARRY-OK", len(survivors), fresh)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_reallocation_carries_adam_state_of_survivors(stage: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           __file__, str(stage)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "CARRY-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def _base_model(directory: Path, vocab: int) -> Path:
    from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM

    torch.manual_seed(0)
    AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=vocab)).save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "ia3", "full", "hybrid"])
def test_control_modes_train_what_they_should(tmp_path: Path, data_dir: Path, mode: str) -> None:
    """peft_mode lora / ia3 / full and the hybrid allocation without masks (importance from gradients, allocated
    before the first step): adapters (or every weight, for full) change; frozen weights stay bit-identical."""
    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars.persistence import base_state_dict, load_adaptive_model

    vocab = json.loads((data_dir / "metadata.json").read_text())["tokenizer"]["vocab_size"]
    base_dir = _base_model(tmp_path / "base", vocab)
    out = tmp_path / mode
    proc = train(1, [f"data.dir={data_dir}", f"train.output_dir={out}", f"train.init_from={base_dir}", "train.max_steps=3",
                     "train.zero_stage=2", *[a for a in TINY if a != "train.export_at_end=false"],
                     "scan_order.enabled=false", "masks.enabled=false", f"peft.mode={mode}", "optim.lr=0.01", "peft.lora_r=2",
                     "peft.application_ratio=0.5"])
    base = AdaptiveMambaForCausalLM.from_pretrained(base_dir).state_dict()
    tuned = load_adaptive_model(out / "export" / "adaptive")
    after = base_state_dict(tuned)
    changed = {n for n, v in base.items() if not torch.equal(after[n], v)}
    adapters = {n: p for n, p in tuned.named_parameters() if "lora_" in n or "ia3_" in n}
    if mode == "full":
        assert changed == set(base) and not adapters
        return
    assert changed == set(), f"frozen base weights changed: {sorted(changed)}"
    kinds = {"lora": ("lora",), "ia3": ("ia3",), "hybrid": ("lora", "ia3")}[mode]
    alloc = json.loads((out / "export" / "adaptive" / "allocation.json").read_text())["decision"]["kinds"]
    if mode == "hybrid":   # 6 modules, ratio 0.5, threshold 0.5: round(3) adapted, round(1.5) = 2 LoRA
        assert sorted(alloc.values()) == ["frozen", "frozen", "frozen", "ia3", "lora", "lora"]
        assert "PEFT allocation at step 0" in proc.stdout + proc.stderr
    else:
        assert set(alloc.values()) == set(kinds) and len(alloc) == 6
    for name, p in adapters.items():   # moved away from the identity initialisation: they got gradients
        if "lora_B" in name:
            assert p.abs().sum() > 0, name
        elif "ia3_l" in name:
            assert not torch.equal(p, torch.ones_like(p)), name


if __name__ == "__main__":
    _carry_worker(int(sys.argv[1]))
