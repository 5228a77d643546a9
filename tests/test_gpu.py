"""CUDA checks: mamba-ssm's compiled kernel through our dispatch agrees with the reference, and the model runs
on the GPU. Skipped on machines without CUDA or without the `selective_scan_cuda` extension (CI has neither);
run them on a GPU machine with `pytest -m gpu` after installing the `[cuda]` extra."""
from __future__ import annotations

import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.ops import cuda_kernel_available, selective_scan, selective_scan_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not cuda_kernel_available(), reason="needs mamba-ssm's compiled selective_scan_cuda"),
]


@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_scan_matches_reference(groups):
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 64, 16, 300
    shape_bc = (b, n, length) if groups is None else (b, groups, n, length)
    cpu = dict(u=torch.randn(b, d, length, generator=g), delta=0.5 * torch.randn(b, d, length, generator=g),
               A=-torch.rand(d, n, generator=g) - 0.1, B=torch.randn(*shape_bc, generator=g),
               C=torch.randn(*shape_bc, generator=g), D=torch.randn(d, generator=g),
               z=torch.randn(b, d, length, generator=g), delta_bias=torch.rand(d, generator=g))
    h0 = torch.randn(b, d, n, generator=g)

    def run(device, fn, dtype):
        leaves = {k: v.to(device, dtype).requires_grad_(True) for k, v in cpu.items()}
        out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        out.float().pow(2).sum().backward()
        return out, last, {k: v.grad for k, v in leaves.items()}

    out_ref, last_ref, g_ref = run("cpu", selective_scan_ref, torch.float64)
    out, last, grads = run("cuda", selective_scan, torch.float32)
    torch.testing.assert_close(out.cpu().double(), out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.cpu().double(), last_ref, rtol=1e-4, atol=1e-4)
    for k in g_ref:
        torch.testing.assert_close(grads[k].cpu().double(), g_ref[k], rtol=1e-3, atol=1e-3, msg=k)
    # a non-zero initial state is added exactly (the CUDA kernel starts from zero; we correct for it)
    args = {k: v.cuda() for k, v in cpu.items()}
    with_state = selective_scan(**args, delta_softplus=True, initial_state=h0.cuda())
    ref = selective_scan_ref(**cpu, delta_softplus=True, initial_state=h0)
    torch.testing.assert_close(with_state.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_model_on_cuda_matches_cpu_and_generates():
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 128))
    with torch.no_grad():
        cpu_logits = model(ids).logits
        gpu_logits = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    out = model.generate(ids[:, :16].cuda(), max_new_tokens=8)
    assert out.shape == (2, 24)


def test_bf16_autocast_training_step_with_masks_on_cuda():
    """What bf16 training runs: masked projections under autocast, the kernel fed bf16 activations and fp32 A/D;
    the loss agrees with fp32 and every gradient is finite."""
    from adaptive_mamba.pillars.masks import MaskConfig, apply_masks

    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=100))
    apply_masks(model, MaskConfig(block_size=8))
    model.cuda()
    ids = torch.randint(0, 100, (2, 512), device="cuda")
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    assert abs(loss.item() - ref) < 2e-2 * ref
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
