"""Pillar 3 inside real DeepSpeed training: the Adam state of every parameter that survives a reallocation is
carried to the rebuilt optimizer (2 CPU ranks, ZeRO-2 and ZeRO-3), and the controls reachable from the trainer
config (peft_mode lora / ia3 / full, hybrid without masks) train what they should and nothing else.

The carry-over worker runs under torchrun from this same file (`python -m torch.distributed.run ... THIS_FILE
STAGE...`), once for both stages (one launch, one process group); the control runs go through launch/train.py
like a user's, two at a time (each is one single-threaded process)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.test_train_runs import TINY, _env, _port, data_dir, train  # noqa: E402,F401  (data_dir: fixture)

if TYPE_CHECKING:
    from adaptive_mamba.training.distributed import DistContext

pytestmark = pytest.mark.distributed
TARGETS = ("in_proj", "x_proj", "out_proj")


def _carry_workers(stages: list[int]) -> None:
    """One process group for every stage (a torchrun launch and its imports cost more than a stage's check)."""
    import torch.distributed as dist

    from adaptive_mamba.training.distributed import DistContext, init_distributed

    env = os.environ
    ctx = DistContext(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                      master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))
    init_distributed(ctx)
    for stage in stages:
        survivors, fresh = _carry_worker(ctx, stage)
        if ctx.is_main:
            print(f"CARRY-OK zero{stage}", survivors, fresh, flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _carry_worker(ctx: DistContext, stage: int) -> tuple[int, int]:
    """Train 3 steps with LoRA / IA3 / frozen modules, reallocate (merge, keep, add), rebuild the engine the way
    Trainer.rebuild_engine does, and check the moments and steps that arrive in the new optimizer. Returns the
    number of surviving and of fresh parameters."""
    import torch.distributed as dist

    from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars import AllocationDecision, HybridPeftConfig, MaskConfig, apply_allocation, apply_masks
    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.engine import (_get_moment, _state_groups, build_engine, canonical_param_name,
                                                deepspeed_config, full_state_dict, load_optimizer_state,
                                                optimizer_state)
    from adaptive_mamba.training.trainer import TrainingObjective

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
    return len(survivors), fresh


CARRY_STAGES = (2, 3)


@pytest.fixture(scope="module")
def carry_run() -> subprocess.CompletedProcess:
    """Both stages' carry-over checks in one torchrun launch of 2 ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           __file__, *map(str, CARRY_STAGES)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("stage", CARRY_STAGES)
def test_reallocation_carries_adam_state_of_survivors(carry_run: subprocess.CompletedProcess, stage: int) -> None:
    proc = carry_run
    assert f"CARRY-OK zero{stage}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _base_model(directory: Path, vocab: int) -> Path:
    from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM

    torch.manual_seed(0)
    AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=vocab)).save_pretrained(directory)
    return directory


CONTROL_MODES = ("lora", "ia3", "full", "hybrid")
Finished = subprocess.CompletedProcess | AssertionError | subprocess.TimeoutExpired


@pytest.fixture(scope="module")
def control_runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, tuple[Path, Path, Finished]]:
    """One 3-step fine-tuning run per mode from the same saved base model. The runs are single-threaded processes,
    so they go two at a time (one per core of a 2-core CI machine). Per mode: (base dir, output dir, the finished
    process, or the error of a failed one, raised by that mode's test)."""
    tmp = tmp_path_factory.mktemp("control_modes")
    vocab = json.loads((data_dir / "metadata.json").read_text())["tokenizer"]["vocab_size"]
    base_dir = _base_model(tmp / "base", vocab)

    def run(mode: str) -> Finished:
        try:
            return train(1, [f"data.dir={data_dir}", f"train.output_dir={tmp / mode}", f"train.init_from={base_dir}",
                             "train.max_steps=3", "train.zero_stage=2",
                             *[a for a in TINY if a != "train.export_at_end=false"], "scan_order.enabled=false",
                             "masks.enabled=false", f"peft.mode={mode}", "optim.lr=0.01", "peft.lora_r=2",
                             "peft.application_ratio=0.5"])
        except (AssertionError, subprocess.TimeoutExpired) as err:
            return err

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(CONTROL_MODES, pool.map(run, CONTROL_MODES)))
    return {mode: (base_dir, tmp / mode, proc) for mode, proc in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", CONTROL_MODES)
def test_control_modes_train_what_they_should(control_runs: dict[str, tuple[Path, Path, Finished]], mode: str) -> None:
    """peft_mode lora / ia3 / full and the hybrid allocation without masks (importance from gradients, allocated
    before the first step): adapters (or every weight, for full) change; frozen weights stay bit-identical."""
    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars.persistence import base_state_dict, load_adaptive_model

    base_dir, out, proc = control_runs[mode]
    if isinstance(proc, Exception):
        raise proc
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
    _carry_workers([int(a) for a in sys.argv[1:]])
