"""The peft LoRA variant of masked projections (see hybrid_peft.py, "Exact merges"). Its own module because it
subclasses a peft class: importing it loads peft, which hybrid_peft.py does only when adapters are applied."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from torch import Tensor

from adaptive_mamba.pillars.common import base_layer


class MaskedLoraVariant(LoraVariant):
    """peft LoRA whose update is masked like the base weight (hybrid_peft.py's "Exact merges"): the layer
    computes (W + s B A) * M with M the base MaskedLinear's current mask (same sample in training, hard in
    evaluation). Merging is plain LoRA's W += s B A, which the mask then multiplies."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing beyond plain LoRA's weights."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight + module.get_delta_weight(active_adapter)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight - module.get_delta_weight(active_adapter)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        mask = base_layer(module).current_mask().to(x.dtype)        # broadcastable against the (out, in) weight
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        if mask.shape[0] == 1:                                      # input columns
            return result + lora_B(lora_A(x * mask[0])) * scaling
        if mask.shape[1] == 1:                                      # output rows
            return result + lora_B(lora_A(x)) * (scaling * mask[:, 0])
        delta = (lora_B.weight @ lora_A.weight) * (scaling * mask)  # unstructured: mask the delta weight
        return result + F.linear(x, delta)
