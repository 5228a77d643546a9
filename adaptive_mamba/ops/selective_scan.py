"""Selective scan (the Mamba-1 SSM recurrence) with mamba-ssm's signature, layouts and semantics.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None)

u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,).
    delta <- softplus(delta + delta_bias)                       (each step optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t    (h: (batch, dim, N), h_{-1} = initial_state or 0)
    y_t    = <h_t, C_t> + D * u_t;   out = y * silu(z)
Returns out (dtype of u), or (out, last_state) with last_state = h_{L-1} in float32. `initial_state` is our
extension, and so are gradients through both states (mamba-ssm has neither): a long document is processed chunk
by chunk with the state carried over (recurrent scoring, generation), and trained that way with exact gradients
(`adaptive_mamba.chunked`, `adaptive_mamba.context_parallel`).

Dispatch: CUDA tensors -> mamba-ssm's compiled `selective_scan_cuda` (imported lazily), which starts from zero
and gives its last state without gradient, so the initial state's share and a differentiable last state come
from the state algebra below (linear in h); CPU float32 -> our C++ kernel (JIT-built once, cached), which takes
the initial state and gives both state gradients itself; otherwise, or when no compiler is available, a chunked
pure-torch scan. `selective_scan_ref` is the plain per-step reference the tests compare against.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from adaptive_mamba.ops import _cpu_extension

ScanResult = Tensor | tuple[Tensor, Tensor]


def _expand_groups(BC: Tensor, dim: int) -> Tensor:
    """(b, N, L) or (b, G, N, L) -> (b, dim, N, L) view (reference and fallback only)."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _torch_scan(recurrence, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
                initial_state: Optional[Tensor]) -> ScanResult:
    """Shared frame of the pure-torch scans: promote to >= float32, bias + softplus on delta, expand B/C groups
    to (b, dim, N, L), run `recurrence(u, delta, A, Bx, Cx, h0) -> (y, h_last)`, then the D skip and z gate."""
    ct = torch.promote_types(u.dtype, torch.float32)
    uc, A = u.to(ct), A.to(ct)
    delta = _prepare_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    dim = u.shape[1]
    Bx, Cx = _expand_groups(B.to(ct), dim), _expand_groups(C.to(ct), dim)
    h0 = uc.new_zeros(u.shape[0], dim, A.shape[1]) if initial_state is None else initial_state.to(ct)
    y, h = recurrence(uc, delta, A, Bx, Cx, h0)
    out = _finish(y, uc, None if D is None else D.to(ct), None if z is None else z.to(ct)).to(u.dtype)
    return (out, h.float()) if return_last_state else out


def _step_by_step(u: Tensor, delta: Tensor, A: Tensor, Bx: Tensor, Cx: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    return torch.stack(ys, dim=2), h


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, *, initial_state: Optional[Tensor] = None) -> ScanResult:
    """Plain step-by-step reference in the input's precision (float32 at least). Slow: for tests only."""
    return _torch_scan(_step_by_step, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                       initial_state)


def _scan_chunk(u: Tensor, delta: Tensor, A: Tensor, Bx: Tensor, Cx: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Scan one chunk of T steps with a log-depth (Hillis-Steele) scan over (b, dim, T, N) tensors."""
    decay = torch.exp(delta[..., None] * A[:, None, :])                  # (b, d, T, N)
    inp = (delta * u)[..., None] * Bx.transpose(-1, -2)                  # (b, d, T, N)
    T, shift = u.shape[-1], 1
    while shift < T:
        inp = torch.cat([inp[:, :, :shift], inp[:, :, shift:] + decay[:, :, shift:] * inp[:, :, :-shift]], dim=2)
        decay = torch.cat([decay[:, :, :shift], decay[:, :, shift:] * decay[:, :, :-shift]], dim=2)
        shift *= 2
    h = inp + decay * h0[:, :, None, :]                                  # states h_t of the chunk
    y = torch.einsum("bdtn,bdnt->bdt", h, Cx)
    return y, h[:, :, -1]


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, *, initial_state: Optional[Tensor] = None,
                         chunk_size: int = 64) -> ScanResult:
    """Differentiable pure-torch scan: chunks of `chunk_size` steps, each rematerialised in backward.

    Memory is O(b * dim * chunk_size * N) for the live chunk plus one (b, dim, N) state per chunk. It is the
    fallback when the C++ kernel cannot be built, and the path for float64 and non-CPU/CUDA devices.
    """
    def chunked(u: Tensor, delta: Tensor, A: Tensor, Bx: Tensor, Cx: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, Bx, Cx, h))
        ys = []
        for s in range(0, u.shape[-1], chunk_size):
            sl = slice(s, s + chunk_size)
            args = (u[..., sl], delta[..., sl], A, Bx[..., sl], Cx[..., sl], h)
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False) if grad else _scan_chunk(*args)
            ys.append(y)
        return torch.cat(ys, dim=-1), h

    return _torch_scan(chunked, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                       initial_state)


def _step_major(BC: Tensor) -> Tensor:
    """(b, N, L) / (b, G, N, L) -> float32 (b, G, N, L) whose N stride is 1 (one step's N values contiguous).
    B and C sliced from x_proj's (b, L, N) output already are; other layouts are copied once."""
    BC = (BC.unsqueeze(1) if BC.dim() == 3 else BC).float()
    return BC if BC.stride(-2) == 1 else BC.transpose(-1, -2).contiguous().transpose(-1, -2)


def _opt(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t.float()


class _SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper of the C++ kernel (delta already biased/softplus'ed; the z gate fused). It takes u, delta
    and z in any strides (no copies for the model's (b, L, d) activations), saves the inputs and, when a backward
    will follow, the state entering every 64 steps; the backward recomputes the states in between. Gradients
    flow through the initial state h0 and the returned last state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, h0, grad_enabled):  # type: ignore[override]
        ext = _cpu_extension.load()
        tensors = (u.float(), delta.float(), A.float().contiguous(), _step_major(B), _step_major(C),
                   _opt(D, u).contiguous(), _opt(z, u), _opt(h0, u).contiguous())
        # needs_input_grad is True for a parameter even under no_grad: the caller's grad mode decides too
        out, last, kept = ext.fwd(*tensors, grad_enabled and any(ctx.needs_input_grad))
        ctx.save_for_backward(*tensors, kept)
        ctx.meta = (B.dim(), C.dim(), B.dtype, C.dtype, u.dtype, delta.dtype, A.dtype, D is not None,
                    None if z is None else z.dtype, None if h0 is None else h0.dtype)
        ctx.set_materialize_grads(False)       # an unused output (often one of the two) costs no zero tensor
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):  # type: ignore[override]
        bdim, cdim, bdt, cdt, udt, ddt, adt, has_d, zdt, h0dt = ctx.meta
        *tensors, kept = ctx.saved_tensors
        u = tensors[0]
        dout = u.new_zeros(()).expand(u.shape) if dout is None else dout.float()
        dlast = u.new_empty(0) if dlast is None else dlast.float().contiguous()
        workers = _backward_workers(tensors[3])
        du, ddelta, dA, dB, dC, dD, dz, dh0 = _cpu_extension.load().bwd(*tensors, kept, dout, dlast, workers)

        def back(g: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
            g = g.transpose(-1, -2)                                   # (b, G, L, N) -> (b, G, N, L)
            return (g.squeeze(1) if ndim == 3 else g).to(dtype)

        return (du.to(udt), ddelta.to(ddt), dA.to(adt), back(dB, bdim, bdt), back(dC, cdim, cdt),
                dD if has_d else None, None if zdt is None else dz.to(zdt), None if h0dt is None else dh0.to(h0dt),
                None)


def _backward_workers(Bm: Tensor) -> int:
    """Channel ranges for the backward: one per thread, capped so the private dB/dC buffers stay < ~256 MiB."""
    per_worker = 2 * Bm.numel() * 4
    return max(1, min(torch.get_num_threads(), (256 << 20) // max(per_worker, 1)))


def _channel_stride_1(t: Tensor) -> Tensor:
    """t in float32 with the last stride 1, as the conv kernel needs (contiguous() keeps any stride of a size-1
    dimension, e.g. the 0 of an expanded gradient of one channel)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


class _Conv1dSiLUCPU(torch.autograd.Function):
    """Causal depthwise conv1d + SiLU on (b, L, d) activations (the C++ kernel), so the conv needs no transpose."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        xf = _channel_stride_1(x)
        w = weight.float().reshape(weight.shape[0], -1).contiguous()
        b = _opt(bias, x)
        ctx.save_for_backward(xf, w, b)
        ctx.meta = (x.dtype, weight.shape, weight.dtype, bias is not None)
        return _cpu_extension.load().conv1d_silu_fwd(xf, w, b).to(x.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        xdt, wshape, wdt, has_bias = ctx.meta
        dout = _channel_stride_1(dout)
        dx, dw, db = _cpu_extension.load().conv1d_silu_bwd(*ctx.saved_tensors, dout)
        return dx.to(xdt), dw.view(wshape).to(wdt), db if has_bias else None


def causal_conv1d_silu(x: Tensor, conv: torch.nn.Conv1d, channels: Optional[Tensor] = None) -> Tensor:
    """silu(conv(x)) for a depthwise causal `conv` (padding d_conv - 1, output cut to L) on x: (b, L, d) -> (b, L, d).
    A plain nn.Conv1d on the CPU that nothing hooks runs as one fused kernel in this layout (exactly the module's
    computation); otherwise (CUDA, float64, a conv wrapped by an adapter or mask, a hook that observes or alters
    the call) the module itself is called, through a transpose.

    `channels` (indices into the conv's channels): x holds only those channels, and a plain conv runs over them
    only, its weights gathered (their gradients flow into the full parameters); any other conv runs on x placed
    into zeros at full width, and the result is gathered back."""
    plain = type(conv) is torch.nn.Conv1d and not (conv._forward_hooks or conv._forward_pre_hooks)
    if channels is not None and not plain:
        full = x.new_zeros(*x.shape[:-1], conv.in_channels).index_copy(-1, channels, x)
        return causal_conv1d_silu(full, conv).index_select(-1, channels)
    weight, bias = conv.weight, conv.bias
    if channels is not None:
        weight = weight.index_select(0, channels)
        bias = None if bias is None else bias.index_select(0, channels)
    if plain and x.device.type == "cpu" and x.dtype != torch.float64 and _cpu_extension.available():
        return _Conv1dSiLUCPU.apply(x, weight, bias)
    if channels is None:
        return F.silu(conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=conv.padding, groups=weight.shape[0])
    return F.silu(out[..., :x.shape[1]]).transpose(1, 2)


class _SelectiveScanCUDA(torch.autograd.Function):
    """Autograd wrapper of mamba-ssm's compiled kernel, called directly (the package itself is not imported)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # type: ignore[override]
        squeeze = (B.dim() == 3, C.dim() == 3)
        B = (B.unsqueeze(1) if squeeze[0] else B).contiguous()
        C = (C.unsqueeze(1) if squeeze[1] else C).contiguous()
        u, delta = u.contiguous(), delta.contiguous()
        z = None if z is None else z.contiguous()
        out, x, *rest = _cuda_extension().fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out_final = rest[0] if z is not None else out
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        ctx.softplus, ctx.squeeze = delta_softplus, squeeze
        last = x[:, :, -1, 1::2].float()
        ctx.mark_non_differentiable(last)
        return out_final, last

    @staticmethod
    def backward(ctx, dout, _dlast):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = _cuda_extension().bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out if z is not None else None, None,
            ctx.softplus, False)
        dB = dB.squeeze(1) if ctx.squeeze[0] else dB
        dC = dC.squeeze(1) if ctx.squeeze[1] else dC
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, rest[0] if z is not None else None,
                ddelta_bias if delta_bias is not None else None, None)


# Positional arity of selective_scan_cuda's entry points as mamba-ssm 2.3.2.post1 defines them
# (csrc/selective_scan/selective_scan.cpp): fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus) and
# bwd(u, delta, A, B, C, D?, z?, delta_bias?, dout, x?, out?, dz?, delta_softplus, recompute_out_z); no cu_seqlens.
CUDA_ARITY = {"fwd": 9, "bwd": 14}


@functools.cache
def _cuda_extension():
    """mamba-ssm's compiled `selective_scan_cuda`, imported lazily, after checking that its entry points take the
    arguments we pass (pybind11 writes them into each function's docstring as arg0..argN)."""
    import selective_scan_cuda

    check_cuda_signature(selective_scan_cuda)
    return selective_scan_cuda


def check_cuda_signature(ext) -> None:
    """Raise a clear error when a selective_scan_cuda build's fwd/bwd take other arguments than mamba-ssm 2.x's."""
    for name, arity in CUDA_ARITY.items():
        doc = (getattr(ext, name).__doc__ or "").splitlines()
        found = len(re.findall(r"\barg\d+:", doc[0])) if doc else -1
        if found != arity:
            raise RuntimeError(f"selective_scan_cuda.{name} takes {found} arguments, our dispatch passes {arity} "
                               f"(mamba-ssm 2.x): install a matching build, e.g. pip install mamba-ssm==2.3.2.post1 "
                               f"(signature seen: {doc[0] if doc else 'none'})")


def cuda_kernel_available() -> bool:
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ state algebra
# The recurrence is linear in h, so a scan from h0 is the scan from zero plus h0's share:
#     y_t    += silu(z_t) * <exp(A * sum_{s<=t} dt_s) * h0, C_t>
#     h_last  = h_last(from zero) + state_decay(dt, A) * h0,
#     h_last(from zero) = sum_t exp(A * sum_{s>t} dt_s) * dt_t * u_t * B_t.
# In differentiable torch, in blocks of the time axis, each rematerialised in backward: the path for a kernel that
# starts from zero and returns its last state without gradient (mamba-ssm's CUDA kernel).
def _rematerialised(fn, *args):
    """fn(*args), keeping only its inputs for backward (recomputed there) when a graph is being built."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _blocked(fn, length: int, block: int, *args: Tensor) -> list[Tensor]:
    """fn(slice, *args) for consecutive slices of the time axis, each rematerialised in backward, so the
    (B, d, block, N) intermediates of one block are the only ones alive."""
    return [_rematerialised(fn, slice(s, s + block), *args) for s in range(0, length, block)]


def _decay(log_decay: Tensor) -> Tensor:
    """exp(log_decay) with the exponent floored at -60: factors below e^-60 (~1e-26) would otherwise end as
    denormal floats, on which the CPU's elementwise ops run ~100x slower; the change is far below float32
    resolution of any output they feed."""
    return torch.exp(log_decay.clamp(min=-60.0))


def state_decay(dt: Tensor, A: Tensor) -> Tensor:
    """exp(A * sum_t dt_t) (B, d, N) float32: the share of a state entering a scan that is left at its end.
    dt: softplus'ed delta (B, d, L); A: (d, N)."""
    return _decay(dt.float().sum(-1)[..., None] * A.float())


def _zero_start_last_state(sl: slice, suffix: Tensor, A: Tensor, du: Tensor, B: Tensor) -> Tensor:
    return torch.einsum("bdtn,bdt,bnt->bdn", _decay(suffix[..., sl, None] * A[:, None]), du[..., sl], B[..., sl])


def _initial_state_output(sl: slice, cum: Tensor, A: Tensor, h0: Tensor, C: Tensor) -> Tensor:
    return torch.einsum("bdtn,bdn,bnt->bdt", _decay(cum[..., sl, None] * A[:, None]), h0, C[..., sl])


def _single_group(BC: Tensor) -> Tensor:
    if BC.dim() == 4 and BC.shape[1] != 1:
        raise ValueError(f"the state algebra supports one B/C group, got {BC.shape[1]}: scan with the CPU kernel, "
                         "or pass B and C as (batch, N, L)")
    return (BC.squeeze(1) if BC.dim() == 4 else BC).float()


def zero_start_last_state(dt: Tensor, A: Tensor, u: Tensor, B: Tensor, block: int = 256) -> Tensor:
    """The last state of a scan from zero, (B, d, N) float32, differentiable. dt: softplus'ed delta (B, d, L)
    float32; A: (d, N); u: (B, d, L); B: (B, N, L)."""
    incl = torch.flip(torch.cumsum(torch.flip(dt, [-1]), -1), [-1])            # sum_{s>=t}, accurate near the end
    suffix = torch.cat([incl[..., 1:], torch.zeros_like(incl[..., :1])], -1)   # sum_{s>t}
    parts = _blocked(_zero_start_last_state, dt.shape[-1], block, suffix, A.float(), dt * u.float(),
                     _single_group(B))
    return torch.stack(parts).sum(0)


def initial_state_output(dt: Tensor, A: Tensor, C: Tensor, z: Optional[Tensor], h0: Tensor,
                         block: int = 256) -> Tensor:
    """The initial state's share of the (gated) scan output, <exp(A * sum_{s<=t} dt_s) * h0, C_t> (* silu(z_t))."""
    cum = torch.cumsum(dt, -1)
    y = torch.cat(_blocked(_initial_state_output, dt.shape[-1], block, cum, A.float(), h0.float(), _single_group(C)),
                  -1)
    return y if z is None else y * F.silu(z.float())


def continue_from_state(out: Tensor, last: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        z: Optional[Tensor], initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, last) of a scan from zero whose last state carries no gradient -> (out, last) of the scan from
    `initial_state`, with gradients through both states when a graph is being built. dt: softplus'ed delta."""
    dt = dt.float()
    if initial_state is not None:
        out = (out.float() + initial_state_output(dt, A, C, z, initial_state)).to(out.dtype)
    if torch.is_grad_enabled():
        last = _rematerialised(zero_start_last_state, dt, A, u, B)
    return out, last if initial_state is None else last + state_decay(dt, A) * initial_state.float()


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: Optional[Tensor] = None) -> ScanResult:
    """Selective scan with mamba-ssm's signature; see the module docstring for semantics and dispatch."""
    if B.dim() < 3 or C.dim() < 3:
        raise ValueError("selective_scan: only input-dependent B and C are supported, with shapes (batch, N, L) "
                         f"or (batch, G, N, L); got B {tuple(B.shape)} and C {tuple(C.shape)}")
    if u.is_cuda and cuda_kernel_available():
        # the kernel checks dtypes: delta, B, C, z in u's dtype (bf16 under autocast), A, D, delta_bias in float32
        delta, B, C = delta.to(u.dtype), B.to(u.dtype), C.to(u.dtype)
        z = None if z is None else z.to(u.dtype)
        D, delta_bias = (None if t is None else t.float() for t in (D, delta_bias))
        out, last = _SelectiveScanCUDA.apply(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
        if initial_state is not None or (return_last_state and torch.is_grad_enabled()):
            dt = _prepare_delta(delta.float(), None if delta_bias is None else delta_bias.float(), delta_softplus)
            out, last = continue_from_state(out, last, u, dt, A, B, C, z, initial_state)
        return (out, last) if return_last_state else out
    if u.device.type == "cpu" and u.dtype != torch.float64 and _cpu_extension.available():
        delta = _prepare_delta(delta.float(), None if delta_bias is None else delta_bias.float(), delta_softplus)
        out, last = _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, initial_state, torch.is_grad_enabled())
        return (out, last) if return_last_state else out
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                initial_state=initial_state)


def selective_state_update(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One recurrent step for generation. state: (b, dim, N) float32; u, delta (already softplus'ed), z: (b, dim);
    B, C: (b, N). Returns (y (b, dim) in u's dtype, new state). Cost is independent of how many steps came before.
    On the CPU it runs the C++ kernel for one step (which flushes denormal states that would make torch's
    elementwise ops ~100x slower once the state has decayed)."""
    if state.device.type == "cpu" and _cpu_extension.available():
        y, new_state, _ = _cpu_extension.load().fwd(
            u.float()[..., None], delta.float()[..., None], A.float().contiguous(), B.float()[:, None, :, None],
            C.float()[:, None, :, None], _opt(D, u).contiguous(), _opt(None if z is None else z[..., None], u),
            state.float().contiguous(), False)
        return y[..., 0].to(u.dtype), new_state
    dt = delta.float()
    state = torch.exp(dt[..., None] * A.float()) * state + (dt * u.float())[..., None] * B.float()[:, None, :]
    y = (state * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), state


__all__ = ["causal_conv1d_silu", "continue_from_state", "selective_scan", "selective_scan_ref", "selective_scan_torch",
           "selective_state_update", "state_decay", "cuda_kernel_available"]
