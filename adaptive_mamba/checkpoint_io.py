"""Reading and writing model directories in three formats.

- ours:         config.json (model_type "adaptive_mamba") + model.safetensors, keys as in AdaptiveMambaForCausalLM
- transformers: config.json (model_type "mamba") + model.safetensors / sharded safetensors / pytorch_model.bin,
                keys backbone.embeddings.*, backbone.layers.N.{norm,mixer}.*, backbone.norm_f.*, lm_head.*
- state-spaces: config.json with d_model / n_layer / vocab_size / ssm_cfg ... + pytorch_model.bin,
                keys backbone.embedding.*, backbone.layers.N.{norm,mixer}.*, backbone.norm_f.*, lm_head.*
                (vocab padded to pad_vocab_size_multiple)
Loading is strict: missing, unexpected or mis-shaped tensors raise one error that lists all of them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptive_mamba.config import AdaptiveMambaConfig

Model = TypeVar("Model", bound=nn.Module)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message says what is wrong and how to fix it."""


def save_model(model: nn.Module, directory: str | Path,
               state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write `model.config` and its weights (a model with an AdaptiveMambaConfig `config`). `state_dict` (default
    model.state_dict()) lets a caller save the base weights of a wrapped model (pillars)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)          # never leave a half-written weights file
    model.config.save(directory / CONFIG_NAME)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a model directory (expected one written by "
                              "save_pretrained, a transformers Mamba checkpoint or a state-spaces checkpoint)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, sharded *.safetensors (with index) or pytorch_model.bin."""
    try:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(load_file(str(directory / name)))
            return state
        if (directory / WEIGHTS_NAME).is_file():
            return load_file(str(directory / WEIGHTS_NAME))
        if (directory / "pytorch_model.bin").is_file():
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError, Exception) as err:
        raise CheckpointError(f"could not read the weights in {directory}: {type(err).__name__}: {err}. "
                              "The file is corrupt or truncated; re-export or re-download it.") from err
    raise CheckpointError(f"{directory} has no weights: expected {WEIGHTS_NAME}, model.safetensors.index.json "
                          "or pytorch_model.bin")


def _from_transformers(cfg: dict[str, Any]) -> AdaptiveMambaConfig:
    return AdaptiveMambaConfig(
        d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
        d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4), expand=cfg.get("expand", 2),
        dt_rank=cfg.get("time_step_rank", "auto"), conv_bias=cfg.get("use_conv_bias", True),
        bias=cfg.get("use_bias", False), norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=cfg.get("residual_in_fp32", True), pad_vocab_size_multiple=1,
        tie_embeddings=cfg.get("tie_word_embeddings", True))


def _from_state_spaces(cfg: dict[str, Any]) -> AdaptiveMambaConfig:
    ssm = dict(cfg.get("ssm_cfg") or {})
    if ssm.pop("layer", "Mamba1") != "Mamba1" or cfg.get("attn_layer_idx") or cfg.get("d_intermediate", 0):
        raise CheckpointError("only Mamba-1 state-spaces checkpoints without attention or MLP layers are supported "
                              f"(got ssm_cfg={cfg.get('ssm_cfg')}, attn_layer_idx={cfg.get('attn_layer_idx')}, "
                              f"d_intermediate={cfg.get('d_intermediate')})")
    if not cfg.get("rms_norm", True):
        raise CheckpointError("state-spaces checkpoint uses LayerNorm (rms_norm=false); only RMSNorm is supported")
    known = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
             "conv_bias", "bias"}
    if set(ssm) - known:
        raise CheckpointError(f"unsupported ssm_cfg keys {sorted(set(ssm) - known)} in the state-spaces config")
    return AdaptiveMambaConfig(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
                               residual_in_fp32=cfg.get("residual_in_fp32", True),
                               pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
                               tie_embeddings=cfg.get("tie_embeddings", True), **ssm)


def _rename(pattern_map: list[tuple[str, str]]) -> Callable[[str], str]:
    compiled = [(re.compile(p), r) for p, r in pattern_map]

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return key
    return rename


_RENAMES = {
    "transformers": _rename([(r"^backbone\.embeddings\.", "embedding."), (r"^backbone\.layers\.", "blocks."),
                             (r"^backbone\.norm_f\.", "norm_f.")]),
    "state-spaces": _rename([(r"^backbone\.embedding\.", "embedding."), (r"^backbone\.layers\.", "blocks."),
                             (r"^backbone\.norm_f\.", "norm_f.")]),
}


def detect_format(cfg: dict[str, Any]) -> str:
    if cfg.get("model_type") == AdaptiveMambaConfig.model_type:
        return "ours"
    if cfg.get("model_type") == "mamba" or "hidden_size" in cfg:
        return "transformers"
    if "d_model" in cfg and "n_layer" in cfg:
        return "state-spaces"
    raise CheckpointError(f"unrecognised config.json (model_type={cfg.get('model_type')!r}): expected "
                          "'adaptive_mamba', a transformers 'mamba' config or a state-spaces config with d_model/n_layer")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, raising one CheckpointError listing every missing/unexpected/mis-shaped key."""
    own = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model, "config", None) is not None and model.config.tie_embeddings else set()
    if "lm_head.weight" in tied and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"].to(own["embedding.weight"].dtype), state["embedding.weight"]
                           .to(own["embedding.weight"].dtype)):
            raise CheckpointError(f"{source}: lm_head.weight differs from the embedding but the config says the "
                                  "embeddings are tied; set tie_embeddings=false in config.json")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                 if keys]
        raise CheckpointError(f"cannot load {source}: " + "; ".join(parts) +
                              ". The weights do not match the architecture in config.json.")
    model.load_state_dict(state, strict=False)


def load_config(directory: str | Path) -> tuple[AdaptiveMambaConfig, str]:
    """The architecture of a model directory in any of the three formats, and the format's name (no weights read)."""
    directory = Path(directory)
    raw = read_config(directory)
    fmt = detect_format(raw)
    try:
        config = {"ours": AdaptiveMambaConfig.from_dict, "transformers": _from_transformers,
                  "state-spaces": _from_state_spaces}[fmt](raw)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory}/{CONFIG_NAME} ({fmt} format) is invalid: {err}") from err
    return config, fmt


def load_model(cls: Callable[[AdaptiveMambaConfig], Model], directory: str | Path,
               dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> Model:
    """`cls(config)` (the model class, passed in: this module sits below the model) with the weights of
    `directory`, in any of the three formats."""
    directory = Path(directory)
    config, fmt = load_config(directory)
    state = read_weights(directory)
    if fmt != "ours":
        state = {_RENAMES[fmt](k): v for k, v in state.items()}
    model = cls(config)
    load_state_strict(model, state, f"{directory} ({fmt} format)")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
