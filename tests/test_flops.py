"""Whole-model executed FLOPs (adaptive_mamba.flops): the matmul and conv counts equal torch's FlopCounterMode on the
dense model, forward and training step; masks and the compact export lower what is counted and what executes."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import adaptive_mamba.model as model_module
from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.flops import format_flops, mixer_flops, model_flops
from adaptive_mamba.pillars import MaskConfig, apply_masks, compile_masks, masked_modules, sparsity_report

def tiny_model(seed: int = 0) -> AdaptiveMambaForCausalLM:
    torch.manual_seed(seed)
    return AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=128))


MATMUL_MODULES = ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d", "lm_head")


@contextmanager
def torch_sees_the_conv() -> Iterator[None]:
    """The CPU path runs the depthwise conv in our fused conv+SiLU kernel, which FlopCounterMode cannot see. A forward
    hook on the conv (the kernel's dispatch rule) makes it run as the nn.Conv1d it equals, so that torch counts it;
    this applies that rule to every mixer's conv, compact mixers built during the forward included."""
    fused = model_module.causal_conv1d_silu

    def through_the_module(x: torch.Tensor, conv: torch.nn.Conv1d, channels=None) -> torch.Tensor:
        hook = conv.register_forward_hook(lambda *_: None)
        try:
            return fused(x, conv, channels)
        finally:
            hook.remove()

    model_module.causal_conv1d_silu = through_the_module
    try:
        yield
    finally:
        model_module.causal_conv1d_silu = fused


def counted(fn, ops: tuple[str, ...] = ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution")) -> int:
    """The matmul / conv FLOPs torch counts inside the projections, the conv and lm_head while fn runs (not the
    scan, whose pure-torch fallback would add einsums of its own)."""
    counter = FlopCounterMode(display=False)
    with torch_sees_the_conv(), counter:
        fn()
    return sum(v for name, table in counter.get_flop_counts().items() if name.rsplit(".", 1)[-1] in MATMUL_MODULES
               for op, v in table.items() if str(op) in ops)


def test_dense_forward_matmuls_equal_flop_counter() -> None:
    model = tiny_model().eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch_count = counted(lambda: model(ids))
    count = model_flops(model, seq_len=24, batch=2)
    assert sum(count.matmul.values()) == torch_count          # exact: same shapes, 2 FLOPs per multiply-add
    per_layer = mixer_flops(model.config, 128, 24)
    assert count.forward["blocks.0.mixer.in_proj"] == 2 * per_layer["in_proj"] == 2 * 2 * 24 * 64 * 256
    assert count.forward["lm_head"] == 2 * 48 * 64 * 128
    assert count.forward["blocks.1.mixer.scan"] == 2 * 24 * 128 * (7 * 16 + 7)
    assert "training step" in format_flops(count)


def test_dense_training_step_matmuls_equal_flop_counter() -> None:
    """Backward: input and weight gradient of every trainable matmul; lm_loss recomputes its logits once."""
    model = tiny_model().train()
    ids = torch.randint(0, 128, (2, 24))
    torch_count = counted(lambda: model(ids, labels=ids, return_logits=False).loss.backward(), ("aten.mm", "aten.bmm"))
    count = model_flops(model, seq_len=24, batch=2)
    projections = sum(v for k, v in count.matmul.items() if k.startswith("blocks.") and not k.endswith("conv"))
    head = 2 * 2 * 23 * 64 * 128            # the 23 predicted positions of each sequence
    assert torch_count == 3 * projections + 4 * head      # forward, input and weight gradients; logits recomputed
    conv = sum(v for k, v in count.matmul.items() if k.endswith("conv"))
    elementwise = count.forward_total - sum(count.matmul.values())
    assert count.training_step == torch_count + 3 * conv + 3 * elementwise


def test_masks_lower_counted_flops_and_the_export_executes_them(tmp_path) -> None:
    """Channel masks at 50%: the evaluation forward counts (and torch executes) about half the mixer FLOPs; the
    compact export loaded with from_pretrained counts and executes the same, and its logits equal the masked model."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="channel"))
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.tensor([1.0, -1.0]).repeat(64))
    model.eval()
    ids = torch.randint(0, 128, (2, 24))
    dense = model_flops(tiny_model().eval(), 24, 2)
    masked = model_flops(model, 24, 2)
    with torch.no_grad():
        assert counted(lambda: model(ids)) == sum(masked.matmul.values())
        reference = model(ids).logits
    mixer = [k for k in dense.forward if k.startswith("blocks.")]
    ratio = sum(masked.forward[k] for k in mixer) / sum(dense.forward[k] for k in mixer)
    assert 0.49 < ratio < 0.51
    report = sparsity_report(model, tokens=24)
    assert report["sparsity"] == 0.5
    compile_masks(model)
    model.save_pretrained(tmp_path)
    loaded = AdaptiveMambaForCausalLM.from_pretrained(tmp_path).eval()
    exported = model_flops(loaded, 24, 2)
    assert exported.forward == masked.forward
    with torch.no_grad():
        assert counted(lambda: loaded(ids)) == sum(exported.matmul.values())
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)
    assert exported.training_step < dense.training_step


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_projection_masks_count_what_executes(kind: str) -> None:
    model = tiny_model()
    apply_masks(model, MaskConfig(kind=kind, block_size=8, targets=("in_proj", "x_proj", "out_proj")))
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.tensor([1.0, -1.0]).repeat(m.mask_logits.numel() // 2).view_as(m.mask_logits))
    model.eval()
    ids = torch.randint(0, 128, (2, 24))
    count = model_flops(model, 24, 2)
    with torch.no_grad():
        assert counted(lambda: model(ids)) == sum(count.matmul.values())
    dense = model_flops(tiny_model().eval(), 24, 2)
    in_proj = count.forward["blocks.0.mixer.in_proj"]
    if kind == "structured":          # gathered: half the matmul
        assert in_proj == dense.forward["blocks.0.mixer.in_proj"] // 2
    else:                             # a dense matmul with zeros costs dense FLOPs (+ the mask product)
        assert in_proj == dense.forward["blocks.0.mixer.in_proj"] + 2 * 64 * 256


def test_adapters_are_counted() -> None:
    """LoRA adds 2 T (in r + r out) + 2 T out per module, IA3 one multiply per scaled feature; torch agrees on the
    whole model's matmuls."""
    from adaptive_mamba.pillars import AllocationDecision, HybridPeftConfig, apply_allocation

    model = tiny_model()
    kinds = {f"blocks.{i}.mixer.{p}": "frozen" for i in range(2) for p in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    kinds.update({"blocks.0.mixer.in_proj": "lora", "blocks.1.mixer.out_proj": "ia3"})
    apply_allocation(model, AllocationDecision(kinds, {k: 0.0 for k in kinds}), HybridPeftConfig(lora_r=4))
    model.eval()
    count = model_flops(model, 24, 2)
    T = 48
    assert count.forward["blocks.0.mixer.in_proj.adapter"] == 2 * T * (64 * 4 + 4 * 256) + 2 * T * 256
    ia3 = count.forward["blocks.1.mixer.out_proj.adapter"]
    assert ia3 in (T * 128, T * 64)                     # IA3 scales out_proj's inputs or outputs
    ids = torch.randint(0, 128, (2, 24))
    counter = FlopCounterMode(display=False)
    with torch_sees_the_conv(), counter, torch.no_grad():
        model(ids)
    lora_mm = 2 * T * (64 * 4 + 4 * 256)
    assert counter.get_total_flops() == sum(count.matmul.values()) + lora_mm


def test_channel_sparse_training_counts_the_computed_channels() -> None:
    """Training with 64 of 128 channels per layer fixed at 0: the counted mixer FLOPs are those of a 64-channel mixer,
    and every matmul torch executes in the step (forward, input and weight gradients, recomputed logits) is counted."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="channel"))
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.tensor([3.0, -6.0]).repeat(64))       # sigmoid(-6) < 0.01: exactly 0
    model.train()
    ids = torch.randint(0, 128, (2, 24))
    count = model_flops(model, seq_len=24, batch=2)
    half = mixer_flops(model.config, 64, 24)
    for comp in ("in_proj", "x_proj", "dt_proj", "out_proj", "conv"):
        assert count.forward[f"blocks.1.mixer.{comp}"] == 2 * half[comp]
    assert count.forward["blocks.1.mixer.scan"] == 2 * half["scan"] + 2 * 48 * 64      # u and y times the mask
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids, return_logits=False).loss.backward()
    projections = sum(v for k, v in count.matmul.items() if k.startswith("blocks.") and not k.endswith("conv"))
    head = 2 * 2 * 23 * 64 * 128
    assert counter.get_total_flops() == 3 * projections + 4 * head
    dense = tiny_model()
    apply_masks(dense, MaskConfig(kind="channel", hard_threshold=0.0))
    assert count.training_step < 0.6 * model_flops(dense.train(), seq_len=24, batch=2).training_step
