"""Within-rank chunked training: loss, every parameter gradient and the side effects of a step equal one pass
over the whole sequence, with the pillars (stochastic masks, LoRA and IA3 adapters, scan statistics) present."""
from __future__ import annotations

import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.chunked import chunked_lm_loss
from adaptive_mamba.pillars import (AllocationDecision, HybridPeftConfig, MaskConfig, ScanStatsCollector,
                                    apply_allocation, apply_masks)

PROJ = ("in_proj", "x_proj", "dt_proj", "out_proj")


def pillared_model(n_layer: int = 2, d_model: int = 32, vocab: int = 64, seed: int = 0,
                   masks: str = "structured") -> AdaptiveMambaForCausalLM:
    """A training-mode model with stochastic masks (structured on every projection, or one per d_inner channel),
    LoRA on in_proj / out_proj and IA3 on x_proj / dt_proj (moved off their identity init), every parameter
    trainable."""
    torch.manual_seed(seed)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab))
    apply_masks(model, MaskConfig(kind=masks, block_size=8, targets=PROJ))
    kinds = {f"blocks.{i}.mixer.{p}": ("lora" if p in ("in_proj", "out_proj") else "ia3")
             for i in range(n_layer) for p in PROJ}
    apply_allocation(model, AllocationDecision(kinds, {k: 1.0 for k in kinds}), HybridPeftConfig(target_modules=PROJ))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "ia3_l" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.requires_grad_(True)
    return model.train()


def batch(length: int, vocab: int = 64, batch_size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100                      # ignored positions, also across a chunk boundary
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(model: AdaptiveMambaForCausalLM, ids: torch.Tensor, labels: torch.Tensor,
             chunk_len: int | None) -> tuple[float, dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """loss, gradients, the next random draw and the scan statistics after one forward/backward."""
    model.zero_grad(set_to_none=True)
    for b in model.buffers():
        b.zero_()
    stats = ScanStatsCollector(model)
    stats.enable()
    torch.manual_seed(123)
    loss = model(ids, labels=labels).loss if chunk_len is None else chunked_lm_loss(model, ids, labels, chunk_len)
    loss.backward()
    stats.disable()
    return float(loss.detach()), grads(model), torch.rand(4), [t.clone() for t in stats.state_tensors()] + \
        [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("chunk_len, masks, checkpointing, dtype", [
    (16, "structured", False, torch.float32),
    (7, "structured", False, torch.float32),
    (2, "channel", True, torch.float32),        # chunks shorter than the conv tail; activation checkpointing
    (16, "structured", True, torch.float64),    # the pure-torch scan (used where the C++ kernel is not)
], ids=["16", "7", "2-channel-ckpt", "16-float64-ckpt"])
def test_chunked_loss_and_gradients_equal_one_pass(chunk_len: int, masks: str, checkpointing: bool,
                                                   dtype: torch.dtype) -> None:
    model = pillared_model(masks=masks)
    with torch.no_grad():                 # parameters only: the masks' history buffers stay float32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    ids, labels = batch(50)
    ref_loss, ref_grads, ref_next, ref_side = one_step(model, ids, labels, None)
    model.config.gradient_checkpointing = checkpointing    # the reference is one pass without recomputation
    loss, got, nxt, side = one_step(model, ids, labels, chunk_len)
    assert abs(loss - ref_loss) < 1e-5
    assert got.keys() == ref_grads.keys() and len(got) == sum(1 for p in model.parameters())
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
    torch.testing.assert_close(nxt, ref_next)            # the RNG advanced as one pass would: the same mask noise
    for a, b in zip(side, ref_side):                     # scan statistics see each token once; buffers as one pass
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_bad_chunk_len_is_named() -> None:
    model = pillared_model()
    ids, labels = batch(8)
    with pytest.raises(ValueError, match="chunk_len"):
        chunked_lm_loss(model, ids, labels, 0)
