"""The selective scan: every dispatch path against a float64 step-by-step reference, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from adaptive_mamba.ops import selective_scan, selective_scan_ref, selective_scan_torch
from adaptive_mamba.ops import _cpu_extension


def make_inputs(batch=2, dim=8, nstate=16, length=37, groups=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)
    return dict(
        u=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta=(0.5 * torch.randn(batch, dim, length, generator=g, dtype=dtype)),
        A=-torch.rand(dim, nstate, generator=g, dtype=dtype) * 4 - 0.1,
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
        D=torch.randn(dim, generator=g, dtype=dtype),
        z=torch.randn(batch, dim, length, generator=g, dtype=dtype),
        delta_bias=torch.rand(dim, generator=g, dtype=dtype) - 0.5,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


CASES = [
    dict(),                                                   # plain
    dict(use_D=True),
    dict(use_z=True),
    dict(use_bias=True, softplus=True),
    dict(use_D=True, use_z=True, use_bias=True, softplus=True),
    dict(use_D=True, use_z=True, groups=2),                   # grouped B/C
    dict(use_D=True, use_z=True, use_bias=True, softplus=True, nstate=5),  # state size without a template
]
IMPLS = {"dispatch": selective_scan, "torch": selective_scan_torch}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(sorted(c)) or "plain")
def test_matches_float64_reference(impl, case):
    inputs = make_inputs(nstate=case.get("nstate", 16), groups=case.get("groups"))
    kwargs = dict(D=inputs["D"] if case.get("use_D") else None, z=inputs["z"] if case.get("use_z") else None,
                  delta_bias=inputs["delta_bias"] if case.get("use_bias") else None,
                  delta_softplus=case.get("softplus", False))
    base = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    grads_of = [k for k in base] + [k for k in ("D", "z", "delta_bias") if kwargs[k] is not None]

    def run(fn, dtype):
        leaves = {k: v.to(dtype).requires_grad_(True) for k, v in {**base, **kwargs}.items()
                  if isinstance(v, torch.Tensor)}
        call = {**{k: leaves.get(k) for k in base}, **{k: leaves.get(k) for k in ("D", "z", "delta_bias")}}
        out, last = fn(**call, delta_softplus=kwargs["delta_softplus"], return_last_state=True)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        (out * weights).sum().backward()
        return out, last, {k: leaves[k].grad for k in grads_of}

    out_ref, last_ref, g_ref = run(selective_scan_ref, torch.float64)
    out, last, g = run(IMPLS[impl], torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, out_ref) <= 1e-5
    assert rel_err(last, last_ref) <= 1e-5
    for k in grads_of:
        assert rel_err(g[k], g_ref[k]) <= 1e-5, k


def test_cpu_kernel_is_used_and_builds():
    assert _cpu_extension.available(), "the C++ scan kernel must build on the CI machine (g++ is available)"


@pytest.mark.parametrize("impl", IMPLS)
def test_initial_state_continues_the_sequence(impl):
    """Scanning [0, L) equals scanning [0, k) then [k, L) from the carried state."""
    x = make_inputs(length=50)
    fn = IMPLS[impl]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    full, last_full = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw, return_last_state=True)
    k = 19
    parts = [{n: (v[..., :k] if v.dim() >= 3 else v) for n, v in x.items()},
             {n: (v[..., k:] if v.dim() >= 3 else v) for n, v in x.items()}]
    y1, h = fn(parts[0]["u"], parts[0]["delta"], x["A"], parts[0]["B"], parts[0]["C"], D=x["D"], z=parts[0]["z"],
               delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    y2, h2 = fn(parts[1]["u"], parts[1]["delta"], x["A"], parts[1]["B"], parts[1]["C"], D=x["D"], z=parts[1]["z"],
                delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True, initial_state=h)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, last_full, rtol=1e-5, atol=1e-5)


def test_long_sequence_bf16_inputs_and_shapes():
    x = make_inputs(batch=1, dim=4, length=3000)
    out = selective_scan(x["u"].bfloat16(), x["delta"].bfloat16(), x["A"], x["B"].bfloat16(), x["C"].bfloat16(),
                         D=x["D"], delta_softplus=True)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 3000)
    ref = selective_scan_torch(x["u"].bfloat16().float(), x["delta"].bfloat16().float(), x["A"],
                               x["B"].bfloat16().float(), x["C"].bfloat16().float(), D=x["D"], delta_softplus=True)
    assert rel_err(out.float(), ref) < 1e-2


def _from_zero_then_state_algebra(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                  return_last_state=False, *, initial_state=None):
    """The CUDA path's composition, run on the CPU: a kernel from zero whose last state has no gradient, then
    `continue_from_state` (the initial state's share, and the differentiable last state)."""
    from adaptive_mamba.ops.selective_scan import _prepare_delta, continue_from_state

    out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    return continue_from_state(out, last.detach(), u, dt, A, B, C, z, initial_state)


STATE_IMPLS = {**IMPLS, "zero-start+algebra": _from_zero_then_state_algebra}


@pytest.mark.parametrize("impl", STATE_IMPLS)
def test_gradients_flow_through_initial_and_last_state(impl):
    """A loss on the output and on the last state: gradients of every input and of the initial state equal the
    float64 reference's (what chunked training and context parallelism rely on)."""
    x = make_inputs(length=150)
    h0 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def run(fn, dtype):
        leaves = {k: v.to(dtype).requires_grad_(True) for k, v in {**{k: x[k] for k in names}, "h0": h0}.items()}
        out, last = fn(*(leaves[k] for k in names), delta_softplus=True, return_last_state=True,
                       initial_state=leaves["h0"])
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum() + \
            (last * torch.linspace(2, -1, last.numel(), dtype=dtype).view_as(last)).sum()
        loss.backward()
        return out, last, {k: v.grad for k, v in leaves.items()}

    out_ref, last_ref, g_ref = run(selective_scan_ref, torch.float64)
    out, last, g = run(STATE_IMPLS[impl], torch.float32)
    assert rel_err(out, out_ref) <= 1e-5 and rel_err(last, last_ref) <= 1e-5
    for k, ref in g_ref.items():
        assert ref.abs().max() > 0 and rel_err(g[k], ref) <= 1e-5, k


def test_constant_B_is_rejected_with_a_clear_error():
    x = make_inputs()
    with pytest.raises(ValueError, match="input-dependent B and C"):
        selective_scan(x["u"], x["delta"], x["A"], torch.randn(8, 16), x["C"])


def test_state_update_step_matches_scan_on_both_paths(monkeypatch):
    """The one-token step (C++ on CPU, torch elsewhere) equals scanning the same step with the state carried."""
    from adaptive_mamba.ops.selective_scan import selective_state_update

    x = make_inputs(length=1)
    h0 = torch.randn(2, 8, 16)
    delta = torch.nn.functional.softplus(x["delta"][..., 0])
    want, want_state = selective_scan_ref(x["u"], delta[..., None], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                          return_last_state=True, initial_state=h0)
    y, state = selective_state_update(h0, x["u"][..., 0], delta, x["A"], x["B"][..., 0], x["C"][..., 0],
                                      D=x["D"], z=x["z"][..., 0])
    torch.testing.assert_close(y, want[..., 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-6)
    # the pure-torch branch (used on CUDA, or when no compiler is available)
    monkeypatch.setattr(_cpu_extension, "available", lambda: False)
    y2, state2 = selective_state_update(h0, x["u"][..., 0], delta, x["A"], x["B"][..., 0], x["C"][..., 0],
                                        D=x["D"], z=x["z"][..., 0])
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state2, state, rtol=1e-5, atol=1e-6)


def test_denormal_states_are_flushed_not_slow():
    """States decayed below float32's normal range come back as exact zeros from the kernel."""
    x = make_inputs(batch=1, dim=4, length=1)
    h0 = torch.full((1, 4, 16), 1e-39)            # denormal
    _, last = selective_scan(x["u"] * 0, x["delta"].abs(), x["A"], x["B"], x["C"], return_last_state=True,
                             initial_state=h0)
    assert torch.count_nonzero(last) == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_inputs_from_the_model_layout_match_the_reference(threads):
    """u, delta, z given as (b, d, L) views of (b, L, d) activations and B/C sliced from a (b, L, R + 2N) tensor
    (the model's layouts, no copies) give the reference outputs and gradients. d = 40 leaves a partial channel
    block (blocks are 16 channels); L = 150 spans three of the kept-state chunks (64 steps, the last partial);
    with 2 threads the backward splits the blocks between two workers."""
    b, d, n, length = 2, 40, 16, 150
    g = torch.Generator().manual_seed(1)
    u_bld = torch.randn(b, length, d, generator=g)
    delta_bld = 0.5 * torch.randn(b, length, d, generator=g)
    xz = torch.randn(b, length, 2 * d, generator=g)
    x_dbl = torch.randn(b, length, 3 + 2 * n, generator=g)
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    D, bias = torch.randn(d, generator=g), torch.rand(d, generator=g) - 0.5
    h0 = torch.randn(b, d, n, generator=g)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (u_bld, delta_bld, xz, x_dbl, A, D, bias)]
        u, delta, xz_, x_dbl_, A_, D_, bias_ = leaves
        B, C = x_dbl_[..., 3:3 + n].transpose(1, 2), x_dbl_[..., 3 + n:].transpose(1, 2)
        out, last = fn(u.transpose(1, 2), delta.transpose(1, 2), A_, B, C, D_, xz_[..., d:].transpose(1, 2), bias_,
                       True, True, initial_state=h0.to(dtype))
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        return out, last, [t.grad for t in leaves]

    out_ref, last_ref, g_ref = run(selective_scan_ref, torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, last, grads = run(selective_scan, torch.float32)
    finally:
        torch.set_num_threads(previous)
    assert rel_err(out, out_ref) <= 1e-5 and rel_err(last, last_ref) <= 1e-5
    for name, got, want in zip(("u", "delta", "xz", "x_dbl", "A", "D", "delta_bias"), grads, g_ref):
        assert rel_err(got, want) <= 1e-5, name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d,k,bias", [(8, 4, True), (70, 4, True), (16, 3, False)])
def test_fused_conv_silu_matches_the_module(d, k, bias, threads):
    """The fused causal depthwise conv + SiLU on (b, L, d) equals the nn.Conv1d module (padding k - 1, cut to L),
    forward and gradients, with and without bias. L = 150 spans three of the kernel's 64-step work items (each
    item's gradient needs the k - 1 steps after it); with 2 threads the weight gradients are summed over threads."""
    from adaptive_mamba.ops import causal_conv1d_silu

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=bias).double()
    xz = torch.randn(2, 150, 2 * d, dtype=torch.float64)

    def run(fn, dtype):
        c = conv.to(dtype)
        c.zero_grad()
        x = xz.to(dtype).detach().requires_grad_(True)
        out = fn(x[..., :d], c)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in c.parameters()]
        return out, grads

    module = lambda x, c: torch.nn.functional.silu(c(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)
    want, g_want = run(module, torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, g_got = run(causal_conv1d_silu, torch.float32)
    finally:
        torch.set_num_threads(previous)
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= 1e-5


def test_fused_conv_yields_to_a_hooked_or_wrapped_module():
    """A conv with a forward hook (observer, mask) is called as a module, so the hook sees the call."""
    from adaptive_mamba.ops import causal_conv1d_silu

    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3)
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = causal_conv1d_silu(torch.randn(1, 9, 4), conv)
    assert calls == [torch.Size([1, 4, 12])] and out.shape == (1, 9, 4)
