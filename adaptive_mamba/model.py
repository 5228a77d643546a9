"""Mamba-1 language model, read top to bottom: RMSNorm -> mixer -> block -> causal LM with a recurrent cache.

Every projection (in_proj, x_proj, dt_proj, out_proj) is applied by calling its module on every path
(training, chunked scoring, one-token generation), so masks and adapters that replace or wrap those modules
always take effect and receive gradients. Only the scan (`adaptive_mamba.ops.selective_scan`) and the conv are
fused: a plain, unhooked `nn.Conv1d` runs as the fused conv + SiLU kernel on the CPU (exactly its computation);
a wrapped or hooked conv is called as a module. Activations stay (B, L, d_inner) from in_proj to out_proj; the
scan and the `scan_input` hook see them as (B, d_inner, L) views. With a channel mask, training computes only the
channels whose mask value is not exactly 0 (adaptive_mamba.channel_subset), evaluation runs the compact mixer of the
kept channels; the hook sees the masked scan input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaptive_mamba.channel_subset import ChannelSubset
from adaptive_mamba.checkpoint_io import load_model, save_model
from adaptive_mamba.config import AdaptiveMambaConfig
from adaptive_mamba.ops import causal_conv1d_silu, selective_scan, selective_state_update


@dataclass
class LayerState:
    """Recurrent state of one mixer: the last d_conv - 1 conv inputs and the SSM state (float32)."""

    conv: Tensor  # (batch, d_inner, d_conv - 1)
    ssm: Tensor   # (batch, d_inner, d_state)


@dataclass
class MambaCache:
    """Per-layer recurrent state. Its size does not depend on how many tokens have been processed."""

    layers: list[LayerState]
    seen_tokens: int = 0


@dataclass
class CausalLMOutput:
    logits: Optional[Tensor]
    loss: Optional[Tensor] = None
    cache: Optional[MambaCache] = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv -> SiLU -> (x_proj -> dt_proj, B, C) -> selective scan -> gate -> out_proj."""

    def __init__(self, config: AdaptiveMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_inner = config.d_inner if config.layer_d_inner is None else config.layer_d_inner[layer_idx]
        d_state, dt_rank = config.d_state, config.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, d_state, dt_rank, config.d_conv
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1,
                                bias=config.conv_bias)
        self.scan_input = nn.Identity()  # observation point for the scan input u (B, d_inner, L): pillar 1 hooks here
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self.channel_mask: Optional[nn.Module] = None   # pillar 2's per-channel mask (masks.ChannelMask), if any

    def forward(self, hidden: Tensor, state: Optional[LayerState] = None) -> tuple[Tensor, Optional[LayerState]]:
        """hidden: (B, L, d_model). With `state`, continue from it and return the new state (in place of it)."""
        keep, kept = None, None
        if self.channel_mask is not None:       # channel mask: at evaluation only the kept channels execute
            if not self.training and state is None and self.channel_mask.gathers(self):
                return self.channel_mask.compact(self)(hidden)
            keep = self.channel_mask()                                           # (d_inner,)
            if self.training and state is None:  # training computes only the channels whose mask is not exactly 0
                kept = self.channel_mask.computed_channels(self, keep)
        part = ChannelSubset(self, kept)        # every channel when kept is None
        keep = None if keep is None else part.per_channel(keep)[:, None]          # (k, 1), k computed channels
        length = hidden.shape[1]
        x, z = part.in_proj(hidden).chunk(2, dim=-1)                           # (B, L, d_inner) views
        pad = self.d_conv - 1
        if state is not None:
            conv_in = torch.cat([state.conv.to(x.dtype), x.transpose(1, 2)], dim=-1)
            u = F.silu(self.conv1d(conv_in)[..., pad:pad + length]).transpose(1, 2)
            new_conv = conv_in[..., conv_in.shape[-1] - pad:]
        else:
            u = causal_conv1d_silu(x, self.conv1d, kept)                        # (B, L, d_inner)
        # (B, L, d_inner) activations; the scan and the hook see them as (B, d_inner, L) views, without copies
        u = u.transpose(1, 2)
        if keep is not None:
            u = u * keep.to(u.dtype)
        u = part.scan_input(u)
        x_dbl = part.x_proj(u.transpose(1, 2))                                  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = part.dt_proj(dt).transpose(1, 2)                                # (B, d_inner, L), bias included
        z = z.transpose(1, 2)
        A, D = -torch.exp(part.per_channel(self.A_log).float()), part.per_channel(self.D)
        if state is not None and length == 1:
            y, ssm = selective_state_update(state.ssm, u[..., 0], F.softplus(delta[..., 0].float()), A, B[:, 0],
                                            C[:, 0], D, z[..., 0])
            y = y[..., None]
        else:
            # the last state only when it is carried on (on CUDA a differentiable one costs the state algebra)
            scanned = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D.float(), z,
                                     delta_softplus=True, return_last_state=state is not None,
                                     initial_state=None if state is None else state.ssm)
            y, ssm = scanned if state is not None else (scanned, None)
        if keep is not None:
            y = y * keep.to(y.dtype)
        out = part.out_proj(y.transpose(1, 2).to(hidden.dtype))
        return out, (None if state is None else LayerState(new_conv, ssm))

    def zero_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        return LayerState(torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), the residual stream optionally kept in float32."""

    def __init__(self, config: AdaptiveMambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, hidden: Tensor, state: Optional[LayerState] = None) -> tuple[Tensor, Optional[LayerState]]:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        out, state = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), state)
        return residual + out, state


class AdaptiveMambaForCausalLM(nn.Module):
    """Mamba-1 causal LM with tied embeddings. Loads our, transformers' and state-spaces' checkpoints."""

    def __init__(self, config: AdaptiveMambaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MambaBlock(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba-ssm's initialisation: S4D-real A, dt in [dt_min, dt_max], scaled out_proj."""
        cfg = self.config
        nn.init.normal_(self.embedding.weight, std=cfg.initializer_range)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range)
        for block in self.blocks:
            m: MambaMixer = block.mixer
            block.norm.weight.fill_(1.0)
            for lin in (m.in_proj, m.x_proj, m.out_proj):
                lin.reset_parameters()
                if lin.bias is not None:
                    lin.bias.zero_()
            m.conv1d.reset_parameters()
            if cfg.rescale_prenorm_residual:
                m.out_proj.weight /= math.sqrt(cfg.n_layer)
            std = m.dt_rank ** -0.5 * cfg.dt_scale
            if cfg.dt_init == "constant":
                m.dt_proj.weight.fill_(std)
            else:
                m.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(m.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                           + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
            m.A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).repeat(m.d_inner, 1))
            m.D.fill_(1.0)
        self.norm_f.weight.fill_(1.0)

    # -------------------------------------------------------------------------------------- forward
    def allocate_cache(self, batch: int, device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> MambaCache:
        """Zero recurrent state for `batch` sequences (equivalent to starting a sequence from scratch)."""
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return MambaCache([b.mixer.zero_state(batch, device, dtype) for b in self.blocks])

    def hidden_states(self, input_ids: Tensor, cache: Optional[MambaCache] = None) -> Tensor:
        """Final-norm hidden states (B, L, d_model); with `cache`, continue from it and update it in place."""
        h = self.embedding(input_ids)
        ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if ckpt:
                h, _ = checkpoint(block, h, use_reentrant=False)
            elif cache is None:
                h, _ = block(h)
            else:
                h, cache.layers[i] = block(h, cache.layers[i])
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return self.norm_f(h.to(self.norm_f.weight.dtype))

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, cache: Optional[MambaCache] = None,
                use_cache: bool = False, return_logits: bool = True) -> CausalLMOutput:
        """Logits (B, L, padded_vocab) and, with `labels`, the next-token cross-entropy (labels are shifted here,
        -100 is ignored). `use_cache` continues `cache` (or a fresh one) and returns it. `return_logits=False`
        computes the loss in chunks without ever holding (B, L, vocab) logits (long-sequence training)."""
        if use_cache and cache is None:
            cache = self.allocate_cache(input_ids.shape[0])
        hidden = self.hidden_states(input_ids, cache if use_cache else None)
        loss = None
        if labels is not None:
            loss = lm_loss(self.lm_head, hidden, labels)
        logits = self.lm_head(hidden) if (return_logits or labels is None) else None
        return CausalLMOutput(logits=logits, loss=loss, cache=cache if use_cache else None)

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def stream_tokens(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: Optional[torch.Generator] = None,
                      vocab_size: Optional[int] = None) -> Iterator[Tensor]:
        """Yield the next token of every row (B,), up to `max_new_tokens` times: greedy (default) or sampled.
        The prompt is processed in one parallel pass; each new token then costs one recurrent step, independent of
        the prompt length. Stop iterating to stop generating. Logits past `vocab_size` (default the config's: the
        embedding's padding rows) are never chosen."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate expects input_ids of shape (batch, length >= 1), got {tuple(input_ids.shape)}")
        vocab_size = self.config.vocab_size if vocab_size is None else vocab_size
        cache = self.allocate_cache(input_ids.shape[0])
        step_input = input_ids
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden_states(step_input, cache)[:, -1])
            logits[:, vocab_size:] = -float("inf")
            token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            yield token
            step_input = token[:, None]

    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy (default) or sampled continuation (`stream_tokens`), rows that emitted `eos_token_id` padded with it;
        stops early when every row has. Returns (B, L + new)."""
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for token in self.stream_tokens(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, generator):
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            new_tokens.append(token)
            if bool(done.all()):
                break
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    # ---------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (tied lm_head stored once)."""
        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: Optional[torch.dtype] = None,
                        device: str | torch.device = "cpu") -> "AdaptiveMambaForCausalLM":
        """Load our directories, transformers `MambaForCausalLM` directories or state-spaces checkpoints."""
        return load_model(cls, directory, dtype=dtype, device=device)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: a shared (tied) weight counts once, a ZeRO-3 partitioned parameter with its
    full size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lm_loss(lm_head: nn.Module, hidden: Tensor, labels: Tensor, chunk: int = 2048) -> Tensor:
    """Mean next-token cross-entropy over non-ignored (-100) positions (labels are shifted here)."""
    targets = labels[:, 1:]
    count = (targets != -100).sum()
    if int(count) == 0:
        raise ValueError("every label is -100 (ignored): there is nothing to compute a loss on")
    return vocab_nll(lm_head, hidden[:, :-1], targets, chunk) / count


def vocab_nll(lm_head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int, per_position: bool = False) -> Tensor:
    """Cross-entropy of `targets` (B, L) under the logits lm_head(hidden) (B, L, vocab), positions with target -100
    ignored: their sum (a float32 scalar), or with `per_position` each position's (B, L) float32. The vocabulary
    projection runs `chunk` positions at a time and is recomputed in backward, so memory holds one chunk's logits,
    never (B, L, vocab)."""
    def chunk_nll(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(lm_head(h).float().flatten(0, 1), t.flatten(), ignore_index=-100,
                               reduction="none" if per_position else "sum")

    pieces = []   # split, not slices: the pieces' gradients are joined by one cat, not each zero-padded and summed
    for h, t in zip(hidden.split(chunk, dim=1), targets.split(chunk, dim=1)):
        pieces.append(checkpoint(chunk_nll, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_nll(h, t))
    if per_position:   # split gives at least one piece, an empty one for L = 0
        return torch.cat([p.view(targets.shape[0], -1) for p in pieces], dim=1)
    return sum(pieces, hidden.new_zeros((), dtype=torch.float32))


def sample_next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Greedy argmax, or sampling with temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p      # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
