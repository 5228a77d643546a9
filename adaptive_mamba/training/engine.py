"""DeepSpeed glue: generate the ds_config from the TrainConfig, build the engine with a torch optimizer,
and read or rewrite full parameters (and Adam moments) whatever the ZeRO stage.

`deepspeed_config` writes the whole DeepSpeed config from the training config (train.zero_stage, train.offload,
train.precision, batch sizes, optim.grad_clip), so one run has one source of truth; train.deepspeed_extra names an
optional JSON of further DeepSpeed keys merged last (a key that the training config owns must agree with it).
The optimizer is always torch's AdamW, passed in: a config-built optimizer would become
FusedAdam/CPUAdam and trigger a ~1 minute JIT build on CPU.

When the pillars change which parameters train, the engine is rebuilt; `optimizer_state` /
`load_optimizer_state` carry the Adam moments of every parameter that survives (matched by name without
peft's ".base_layer") and each parameter group's step, through DeepSpeed's safe_get/set API (any ZeRO stage).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from adaptive_mamba.pillars.scan_order import permute_parameter
from adaptive_mamba.training.config import TrainConfig


def _merge(base: dict[str, Any], extra: dict[str, Any], owned: dict[str, Any], path: str = "") -> None:
    """Merge `extra` into `base` in place; a key in `owned` (the training config's) must keep its value."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, owned.get(key, {}), f"{path}{key}.")
            continue
        if key in owned and not isinstance(owned[key], dict) and value != owned[key]:
            raise ValueError(f"{path}{key}={value!r} disagrees with the training config ({owned[key]!r}): remove it "
                             "from train.deepspeed_extra and set train.zero_stage / train.precision / "
                             "train.batch_size / train.grad_accum_steps / optim.grad_clip instead")
        base[key] = copy.deepcopy(value)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage, precision, CPU offload, batch sizes and clipping from `cfg`,
    then the keys of the optional `train.deepspeed_extra` JSON."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage:
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    if t.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if t.offload == "cpu":
        if t.zero_stage == 0:
            raise ValueError("train.offload=cpu needs a ZeRO stage >= 1 (train.zero_stage)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    owned = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum_steps,
             "train_batch_size": t.batch_size * t.grad_accum_steps * world_size,
             "gradient_clipping": cfg.optim.grad_clip, "bf16": {"enabled": t.precision == "bf16"},
             "zero_optimization": {"stage": t.zero_stage}}
    ds = {**copy.deepcopy(owned), "zero_optimization": zero, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if t.offload == "cpu":
        ds["zero_force_ds_cpu_optimizer"] = False       # keep torch AdamW (no CPUAdam JIT build)
    if t.deepspeed_extra is not None:
        _merge(ds, _read_extra(Path(t.deepspeed_extra)), owned)
    return ds


def _read_extra(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_extra={path} does not exist (see ds_configs/extra_example.json)")
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"train.deepspeed_extra={path} is not valid JSON: {err}") from err
    extra = {k: v for k, v in extra.items() if not k.startswith("_")}          # "_comment" keys
    if "optimizer" in extra or "scheduler" in extra:
        raise ValueError(f"{path} defines an optimizer/scheduler: remove it. Training passes torch AdamW and sets "
                         "the learning rate itself (the optim section of the training config)")
    if extra.get("fp16", {}).get("enabled"):
        raise ValueError(f"{path} enables fp16: Mamba's scan is not stable in fp16; use train.precision=bf16")
    return extra


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW over the trainable parameters; weight decay only on 2-D+ weights (not masks, norms, biases);
    mask logits in their own group whose lr is `lr_scale` = masks.learning_rate / optim.lr times the schedule."""
    decay, no_decay, masks = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 if not hasattr(p, "ds_shape") else len(p.ds_shape) >= 2
        if name.endswith("mask_logits"):
            masks.append(p)
        else:
            (decay if is_matrix and cfg.optim.weight_decay > 0 else no_decay).append(p)
    if not (decay or no_decay or masks):
        raise ValueError("the model has no trainable parameters (train.freeze_base with masks and peft both off?)")
    lr = cfg.optim.lr
    mask_scale = (cfg.masks.learning_rate or lr) / lr
    groups = [g for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay, "lr_scale": 1.0, "role": "decay"},
                          {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "role": "no_decay"},
                          {"params": masks, "weight_decay": 0.0, "lr_scale": mask_scale, "role": "masks"})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def build_engine(model: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any]):
    """deepspeed.initialize with torch AdamW; returns the engine (its .module is `model`)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg),
                                           config=copy.deepcopy(ds_config))
    return engine


def _gathered(params: list[nn.Parameter], modifier_rank=None):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the engine's module as full tensors on CPU, trainable ones in their fp32
    master precision. A collective under ZeRO: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = dict(module.named_parameters())
    with _gathered(list(params.values())):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    for name, p in params.items():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)
            if master is not None:
                state[name] = master.detach().cpu().reshape(state[name].shape).clone()
    return state


def permute_engine_params(engine, plan: Iterable[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]) -> None:
    """Rewrite each named parameter as `fn(parameter)` (a channel permutation), together with its fp32 master copy
    and its Adam moments (exp_avg, exp_avg_sq), consistently at every ZeRO stage, through DeepSpeed's public
    safe_get/safe_set API (GatheredParameters for the ZeRO-3 working copy). Call it after at least one optimizer
    step of this engine, when the moments exist (the pillars refresh only after steps). A collective: all ranks
    call it with the same plan."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)

    params = dict(engine.module.named_parameters())
    base_opt = _relinked_optimizer(engine)
    for name, fn in plan:
        if name not in params:
            raise KeyError(f"reparametrisation plan names {name!r}, which the model does not have")
        p = params[name]
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        if master is None and not hasattr(p, "ds_id"):   # no ZeRO (fp32) or frozen: as in a single process
            permute_parameter(p, fn, base_opt.state.get(p, {}))
            continue
        with _gathered([p], modifier_rank=0):        # the full ZeRO-3 working copy (a no-op at ZeRO-1/2)
            with torch.no_grad():
                p.data.copy_(fn(p.data))
        if master is None:                             # a frozen ZeRO-3 parameter
            continue
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        safe_set_full_fp32_param(p, fn(master.reshape(shape)))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, fn(safe_get_full_optimizer_state(p, key).reshape(shape)), key)


MOMENTS = ("exp_avg", "exp_avg_sq")


def _relinked_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under any DeepSpeed wrapper, with ZeRO-1/2/bf16 moment links refreshed: those link each
    parameter to its Adam-moment fragments once, at the first step, and never again, so state that appeared later
    would be invisible to safe_get/set_full_optimizer_state."""
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # The one private access, justified: ZeRO-1/2 and the bf16 optimizer link parameters to their Adam-moment
        # fragments once, after the first step, and a partition whose moments appeared later stays unlinked (2 ranks,
        # ZeRO-2: "exp_avg not found in optimizer state fragment"); DeepSpeed has no public call that relinks.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _state_groups(engine) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
    """(param group, the tensors the torch optimizer keeps Adam state for in it) at any ZeRO stage. ZeRO-3 leaves
    the groups empty outside step() and keeps its fp32 partitions per sub-group."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return [(base.param_groups[opt.sub_group_to_group_id[i]], [flat])
                for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(group, list(group["params"])) for group in base.param_groups]


def _get_moment(p: nn.Parameter, key: str):
    from deepspeed.utils import safe_get_full_optimizer_state

    try:
        return safe_get_full_optimizer_state(p, key)
    except (KeyError, AttributeError, TypeError):
        return None                                    # before the first optimizer step there are no moments


def _is_zero(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def canonical_param_name(name: str) -> str:
    """A parameter's name without peft's '.base_layer': stable when an adapter is added to or merged from its
    module."""
    return name.replace(".base_layer", "")


def optimizer_state(engine) -> dict[str, Any]:
    """{"moments": {canonical name: {"exp_avg", "exp_avg_sq"}} of every trainable parameter (full tensors, CPU),
    "steps": {group role: Adam step}}. A collective under ZeRO: every rank calls it."""
    base_opt = _relinked_optimizer(engine)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if _is_zero(p):
            shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
            found = {key: _get_moment(p, key) for key in MOMENTS}
            state = {k: v.detach().cpu().reshape(shape).clone() for k, v in found.items() if v is not None}
        else:
            state = {k: v.detach().cpu().clone() for k, v in base_opt.state.get(p, {}).items() if k in MOMENTS}
        if state:
            moments[canonical_param_name(name)] = state
    steps: dict[Any, float] = {}
    for group, tensors in _state_groups(engine):
        for q in tensors:
            if "step" in base_opt.state.get(q, {}):
                steps[group.get("role")] = max(steps.get(group.get("role"), 0.0), float(base_opt.state[q]["step"]))
    return {"moments": moments, "steps": steps}


@torch.no_grad()
def load_optimizer_state(engine, saved: dict[str, Any]) -> list[str]:
    """Give a freshly built engine the Adam state of `saved` (from optimizer_state of the previous engine): the
    moments of every trainable parameter found there by canonical name, and each group's step by role. Parameters
    not in `saved` (new adapters) start with zero moments at their group's step, so their first updates are
    smaller than a fresh Adam's bias-corrected ones. Returns the carried names. A collective under ZeRO."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base_opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group, tensors in _state_groups(engine):   # torch Adam creates its state lazily at the first step: now
        step = saved["steps"].get(group.get("role"), 0.0)
        for q in tensors:
            state = base_opt.state[q]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(q), exp_avg_sq=torch.zeros_like(q))
            state["step"].fill_(step)
    _relinked_optimizer(engine)
    carried = []
    for name, p in engine.module.named_parameters():
        moments = saved["moments"].get(canonical_param_name(name))
        if not p.requires_grad or moments is None:
            continue
        for key, value in moments.items():
            if _is_zero(p):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                base_opt.state[p][key].copy_(value.reshape(p.shape))
        carried.append(name)
    return carried
