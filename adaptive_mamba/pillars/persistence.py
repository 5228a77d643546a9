"""Saving and loading a model with its pillar state.

    save_adaptive_model(model, directory)   writes
        config.json, model.safetensors   the base weights under their plain names (AdaptiveMambaForCausalLM.
                                         from_pretrained loads them alone); config.extra keeps the mask config and
                                         the cumulative scan order per layer
        masks.safetensors                mask logits and activation history, by canonical module name
        adapters/lora/, adapters/ia3/    each adapter in peft's format (adapter_model.safetensors from
                                         get_peft_model_state_dict + adapter_config.json)
        allocation.json                  the allocation in force (AllocationDecision, HybridPeftConfig, the printed
                                         table); config.extra["hybrid_peft"] holds the same decision and config
    load_adaptive_model(directory)       rebuilds the same model: base weights, masks, adapters, requires_grad
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load_file, save_file

from adaptive_mamba.checkpoint_io import CheckpointError, save_model
from adaptive_mamba.pillars.hybrid_peft import (ADAPTER_NAMES, AllocationDecision, HybridPeftConfig,
                                                apply_allocation, format_allocation_table, is_adapter_param)
from adaptive_mamba.pillars.common import base_layer, iter_projections
from adaptive_mamba.pillars.masks import CompactLinear, MaskConfig, apply_masks, masked_modules

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

MASKS_NAME = "masks.safetensors"
ALLOCATION_NAME = "allocation.json"
MASK_STATE = ("mask_logits", "mask_history", "history_count")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def base_state_dict(model: "AdaptiveMambaForCausalLM") -> dict[str, torch.Tensor]:
    """The model's own weights under their plain names: peft's '.base_layer' removed, adapters and masks left out."""
    state = {}
    for key, value in model.state_dict().items():
        if is_adapter_param(key) or key.rsplit(".", 1)[-1] in MASK_STATE:
            continue
        state[key.replace(".base_layer", "")] = value
    return state


def save_adaptive_model(model: "AdaptiveMambaForCausalLM", directory: str | Path) -> None:
    """Write the model with its masks, scan order and adapters (layout in the module docstring)."""
    directory = Path(directory)
    masks = masked_modules(model)
    peft_config = getattr(model, "peft_config", {})
    extra = model.config.extra
    if any(isinstance(base_layer(m), CompactLinear) for _, _, m, _ in iter_projections(model)):
        raise ValueError("compiled masks (compile_masks) are for evaluation only and change weight shapes: save the "
                         "model before compiling, and compile again after loading")
    if not masks:
        extra.pop("masks", None)
    if not peft_config and not masks:
        extra.pop("hybrid_peft", None)
    if peft_config and "hybrid_peft" not in extra:
        raise ValueError("the model carries peft adapters that apply_allocation did not create; cannot record them")
    save_model(model, directory, state_dict=base_state_dict(model))
    if masks:
        save_file({f"{name}.{key}": getattr(m, key).detach().contiguous() for name, m in masks.items()
                   for key in MASK_STATE}, str(directory / MASKS_NAME))
    for kind, adapter in ADAPTER_NAMES.items():
        if adapter in peft_config:
            out = directory / "adapters" / kind
            out.mkdir(parents=True, exist_ok=True)
            from peft import get_peft_model_state_dict     # loaded only when there are adapters (it is slow)

            state = get_peft_model_state_dict(model, adapter_name=adapter)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
            peft_config[adapter].save_pretrained(str(out))
    if "hybrid_peft" in extra:
        table = format_allocation_table(AllocationDecision.from_dict(extra["hybrid_peft"]["decision"]))
        (directory / ALLOCATION_NAME).write_text(json.dumps({**extra["hybrid_peft"], "table": table.splitlines()},
                                                            indent=2) + "\n")


def load_adaptive_model(directory: str | Path, dtype: Optional[torch.dtype] = None,
                        device: str | torch.device = "cpu") -> "AdaptiveMambaForCausalLM":
    """Rebuild a model written by save_adaptive_model (a plain model directory loads as the plain model)."""
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

    directory = Path(directory)
    model = AdaptiveMambaForCausalLM.from_pretrained(directory, dtype=dtype, device=device)
    if "masks" in model.config.extra:
        apply_masks(model, MaskConfig.from_dict(model.config.extra["masks"]))
        path = directory / MASKS_NAME
        if not path.is_file():
            raise CheckpointError(f"{directory}: config.json records masks but {MASKS_NAME} is missing")
        saved = load_file(str(path))
        expected = {f"{name}.{key}" for name in masked_modules(model) for key in MASK_STATE}
        if set(saved) != expected:
            raise CheckpointError(f"{path} does not match the masks of config.json: missing "
                                  f"{sorted(expected - set(saved))[:5]}, unexpected {sorted(set(saved) - expected)[:5]}")
        with torch.no_grad():
            for name, m in masked_modules(model).items():
                for key in MASK_STATE:
                    getattr(m, key).copy_(saved[f"{name}.{key}"])
    if "hybrid_peft" in model.config.extra:
        recorded = model.config.extra["hybrid_peft"]
        apply_allocation(model, AllocationDecision.from_dict(recorded["decision"]),
                         HybridPeftConfig.from_dict(recorded["config"]))
        for kind, adapter in ADAPTER_NAMES.items():
            if adapter not in getattr(model, "peft_config", {}):
                continue
            path = directory / "adapters" / kind / ADAPTER_WEIGHTS
            if not path.is_file():
                raise CheckpointError(f"{directory}: the allocation has {kind} adapters but {path} is missing")
            from peft import set_peft_model_state_dict     # loaded only when there are adapters (it is slow)

            result = set_peft_model_state_dict(model, load_file(str(path)), adapter_name=adapter)
            missing = [k for k in result.missing_keys if f".{adapter}" in k and is_adapter_param(k)]
            if result.unexpected_keys or missing:
                raise CheckpointError(f"{path} does not match the allocation: unexpected {result.unexpected_keys[:5]}, "
                                      f"missing {missing[:5]}")
    return model


__all__ = ["base_state_dict", "load_adaptive_model", "save_adaptive_model"]
