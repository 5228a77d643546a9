"""TrainConfig: every setting of a training run, read from YAML/JSON plus `key=value` overrides.

One flat dataclass (grouped by comments) so that a config file, a command-line override and a W&B
run page all use the same names. Unknown keys are errors that name the closest known key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from adaptive_mamba.config import AdaptiveMambaConfig, check_known_keys


@dataclass
class TrainConfig:
    """A training run. Sizes of the seed's `TrainingConfig` keep their names (d_model, n_layers, ...)."""

    # --- model (ignored except gradient_checkpointing when init_from is set: the checkpoint fixes it)
    d_model: int = 64
    n_layers: int = 2
    vocab_size: Optional[int] = None        # None: the tokenizer's vocabulary size
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    init_from: Optional[str] = None         # pretrained model directory (ours / transformers / state-spaces): fine-tune
    freeze_base: Optional[bool] = None      # None: freeze the base weights iff init_from is set (train masks/adapters)
    gradient_checkpointing: Union[bool, str] = "auto"  # "auto": on when seq_len >= 2048

    # --- data
    data_dir: Optional[str] = None          # shards from data_prep; built here first when missing and data_source set
    data_source: Optional[str] = None       # build shards from this source (stdlib | folder:PATH | hf:NAME)
    tokenizer: str = "sentencepiece:8192"   # tokenizer spec for building shards
    data_max_mb: Optional[float] = None     # cap on the source text when building shards
    packing: str = "pack"                   # pack: concatenate documents; pad: one document per window;
                                            # document: whole documents (cut at seq_len), unpadded: a book is one sequence
    val_fraction: float = 0.05

    # --- optimisation
    seq_len: int = 1024
    batch_size: int = 1                     # sequences per rank per micro-step
    grad_accum_steps: int = 1
    learning_rate: float = 1e-3
    mask_learning_rate: Optional[float] = 5e-2   # peak lr of the mask logits (None: learning_rate); same schedule.
                                            # Adam moves a logit ~lr per step: from +3 to 0 in ~60 steps
    min_lr_ratio: float = 0.1               # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 0
    lr_schedule: str = "cosine"             # cosine | constant
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0                  # 0 disables clipping
    num_epochs: int = 1
    max_steps: int = 0                      # optimizer steps; > 0 overrides num_epochs
    seed: int = 0
    precision: str = "fp32"                 # fp32 | bf16
    deepspeed_config: str = "ds_configs/zero2.json"

    # --- long sequences (adaptive_mamba/chunked.py, adaptive_mamba/context_parallel.py)
    chunk_len: int = 0                      # > 0: run each sequence chunk_len tokens at a time, state carried, exact
    context_parallel: int = 1               # ranks sharing one sequence (contiguous pieces); divides the world size

    # --- pillar 1: scan order
    scan_order: bool = True
    scan_update_frequency: int = 50         # optimizer steps between scan-order refreshes (0: never)
    scan_token_stride: int = 8              # the statistics read every n-th token (the hook costs ~1/n of its
                                            # stride-1 cost; any value keeps the refresh exact)

    # --- pillar 2: learned masks
    masking: bool = True
    mask_granularity: str = "structured"    # structured (channel blocks) | unstructured (per weight) | channel
                                            # (per d_inner channel across the whole mixer; ignores mask_targets)
    mask_block_size: int = 8
    mask_targets: str = "in_proj,x_proj,out_proj"   # comma-separated projections masked (and adaptable by pillar 3)
    masking_tau: float = 1.0                # initial temperature
    masking_tau_final: float = 0.1          # temperature at the last step (annealed)
    target_sparsity: float = 0.5
    sparsity_weight: float = 5.0             # of masks.mask_regularizer (BENCHMARKS.md: realised vs target)

    # --- pillar 3: hybrid PEFT (and its controls)
    peft: bool = True
    peft_mode: str = "hybrid"               # hybrid (allocation by importance) | lora / ia3 (that adapter on every
                                            # mask_targets projection) | full (no adapters, every weight trains)
    importance_source: str = "saliency"     # hybrid: saliency (mean |W * grad|, masks optional) | activations (mean
                                            # mask activation over the last 100 steps; needs masking) | random
                                            # (a control: seeded uniform importance at the same budget)
    importance_threshold: float = 0.5
    peft_application_ratio: float = 0.3
    peft_r: int = 8
    peft_alpha: float = 16.0
    peft_reallocation_frequency: int = 100  # optimizer steps between reallocations (0: only once at peft_start_step)
    peft_start_step: Optional[int] = None   # first allocation (0: before the first step); None: 0 when fine-tuning
                                            # (frozen base), else peft_reallocation_frequency

    # --- evaluation
    eval_every: int = 0                     # optimizer steps between evals (0: only at start and end)
    eval_batches: int = 4                   # validation batches per rank per eval

    # --- checkpoints
    output_dir: str = "runs/train"
    save_every: int = 0                     # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: str = "none"                    # none | auto | PATH of a checkpoint directory
    export_at_end: bool = True              # adapters (peft format) and a merged model under output_dir/export
    verify_ranks: bool = True               # after each pillar decision and at the end: all ranks hold identical
                                            # parameters, scan orders and allocations (digests, consistency.jsonl)
    nan_policy: str = "error"               # error: stop at a non-finite loss (the last checkpoint stays good)

    # --- monitoring
    wandb: bool = True
    wandb_project: str = "adaptive-mamba"
    wandb_run_name: Optional[str] = None
    wandb_mode: str = "auto"                # auto (offline unless WANDB_MODE/an API key says otherwise) | online | offline | disabled
    log_every: int = 1
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for key, (ok, rule) in _NUMERIC_RULES.items():
            value = getattr(self, key)
            if value is None and key in _OPTIONAL_NUMBERS:
                continue
            integer = _field_types()[key] in (int, Optional[int])
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise ConfigValueError(key, value, "must be an integer" if integer else "must be a number")
            if not ok(value):
                raise ConfigValueError(key, value, f"must be {rule}")
        choices = {"precision": ("fp32", "bf16"), "lr_schedule": ("cosine", "constant"),
                   "packing": ("pack", "pad", "document"), "mask_granularity": ("structured", "unstructured", "channel"),
                   "peft_mode": ("hybrid", "lora", "ia3", "full"), "importance_source": ("saliency", "activations", "random"),
                   "nan_policy": ("error",), "wandb_mode": ("auto", "online", "offline", "disabled"),
                   "gradient_checkpointing": (True, False, "auto")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.peft and self.peft_mode == "hybrid" and self.importance_source == "activations":
            if not self.masking:
                raise ValueError("importance_source=activations needs masking=true (it averages mask activations); "
                                 "use importance_source=saliency without masks")
            if self.first_allocation_step == 0:
                raise ValueError("importance_source=activations has no mask history before the first step: set "
                                 "peft_start_step >= 1 or importance_source=saliency")
        if self.peft and self.peft_mode == "full" and self.freeze_base:
            raise ValueError("peft_mode=full trains every weight: drop freeze_base=true (or pick peft_mode "
                             "hybrid/lora/ia3)")
        if self.chunk_len and self.context_parallel > 1:
            raise ValueError("chunk_len and context_parallel > 1 cannot be combined: each rank runs its whole piece "
                             "in one pass; set chunk_len=0, or context_parallel=1 to chunk on one rank")
        if self.data_dir is None and self.data_source is None:
            raise ValueError("set data_dir (shards built by `python -m data_prep`) or data_source "
                             "(e.g. data_source=stdlib) so the run has data")

    # ------------------------------------------------------------------------------------- derived
    @property
    def mask_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.mask_targets.split(",") if t.strip())

    @property
    def use_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing == "auto":
            return self.seq_len >= 2048
        return bool(self.gradient_checkpointing)

    @property
    def freeze_base_weights(self) -> bool:
        if self.peft and self.peft_mode == "full":
            return False
        return self.init_from is not None if self.freeze_base is None else bool(self.freeze_base)

    @property
    def first_allocation_step(self) -> int:
        """The step of the first hybrid allocation (0: from gradient saliency before any training step)."""
        if self.peft_start_step is not None:
            return self.peft_start_step
        return 0 if self.freeze_base_weights else max(1, self.peft_reallocation_frequency)

    def model_config(self, vocab_size: int) -> AdaptiveMambaConfig:
        """The architecture of a model trained from scratch (`vocab_size` from the tokenizer unless set)."""
        return AdaptiveMambaConfig(d_model=self.d_model, n_layer=self.n_layers,
                                   vocab_size=self.vocab_size or vocab_size, d_state=self.d_state,
                                   d_conv=self.d_conv, expand=self.expand,
                                   gradient_checkpointing=self.use_gradient_checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


class ConfigValueError(ValueError):
    """A field with an invalid value; `load_train_config` renames it to the spelling the user typed."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(self.message(key))

    def message(self, typed: str, where: str = "") -> str:
        return f"{where}{typed}={self.value!r} is invalid: it {self.rule}"


def _at_least(n: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= n), f">= {n}"


def _above(n: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > n), f"> {n}"


def _between(lo: float, hi: float, hi_open: bool = False) -> tuple[Callable[[float], bool], str]:
    return (lambda v: lo <= v < hi if hi_open else lo <= v <= hi), f"in [{lo}, {hi}{')' if hi_open else ']'}"


# Every numeric field and its valid range (None is allowed for the Optional ones).
_NUMERIC_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "d_model": _at_least(1), "n_layers": _at_least(1), "vocab_size": _at_least(2), "d_state": _at_least(1),
    "d_conv": _at_least(1), "expand": _at_least(1), "data_max_mb": _above(0), "val_fraction": _between(0, 1, True),
    "seq_len": _at_least(2), "batch_size": _at_least(1), "grad_accum_steps": _at_least(1),
    "learning_rate": _above(0), "mask_learning_rate": _above(0), "min_lr_ratio": _between(0, 1),
    "warmup_steps": _at_least(0), "weight_decay": _at_least(0), "adam_beta1": _between(0, 1, True),
    "adam_beta2": _between(0, 1, True), "adam_eps": _above(0), "grad_clip": _at_least(0), "num_epochs": _at_least(1),
    "max_steps": _at_least(0), "seed": _at_least(0), "scan_update_frequency": _at_least(0),
    "scan_token_stride": _at_least(1),
    "mask_block_size": _at_least(1), "masking_tau": _above(0), "masking_tau_final": _above(0),
    "target_sparsity": _between(0, 1, True), "sparsity_weight": _at_least(0), "importance_threshold": _between(0, 1),
    "peft_application_ratio": _between(0, 1), "peft_r": _at_least(1), "peft_alpha": _above(0),
    "chunk_len": _at_least(0), "context_parallel": _at_least(1),
    "peft_reallocation_frequency": _at_least(0), "peft_start_step": _at_least(0), "eval_every": _at_least(0),
    "eval_batches": _at_least(1), "save_every": _at_least(0), "keep_last": _at_least(1), "log_every": _at_least(1),
}
_OPTIONAL_NUMBERS = {"vocab_size", "data_max_mb", "mask_learning_rate", "peft_start_step"}


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def parse_value(key: str, text: str) -> Any:
    """Convert an override's text to the field's type ('none'/'null' -> None, yes/no/true/false -> bool)."""
    hint = _field_types()[key]
    options = get_args(hint) if get_origin(hint) is Union else (hint,)
    low = text.strip().lower()
    if type(None) in options and low in ("none", "null", ""):
        return None
    if bool in options and low in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return low in ("true", "yes", "on", "1")
    for typ in (int, float):
        if typ in options:
            try:
                return typ(text)
            except ValueError:
                continue
    if str in options:
        return text
    raise ValueError(f"cannot parse {key}={text!r}: expected {hint}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['lr=1e-3', ...] -> {'lr': 0.001}; unknown keys raise with a suggestion."""
    return {key: value for key, (_, value) in _parse_overrides(pairs).items()}


def _parse_overrides(pairs: list[str]) -> dict[str, tuple[str, Any]]:
    """{field: (what the user typed for its name, value)}."""
    out: dict[str, tuple[str, Any]] = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        typed, text = pair.split("=", 1)
        key = typed.strip().lstrip("-").replace("-", "_")
        check_known_keys("TrainConfig", {key: None}, known)
        out[key] = (typed.strip(), parse_value(key, text))
    return out


def load_train_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML or JSON file (optional), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                             f"{err}") from err
        data = data or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    check_known_keys("TrainConfig", data, {f.name for f in dataclasses.fields(TrainConfig)})
    typed = {key: (key, f"config file {path}: ") for key in data}
    for key, (name, value) in _parse_overrides(overrides or []).items():
        data[key], typed[key] = value, (name, "command line: ")
    try:
        return TrainConfig(**data)
    except ConfigValueError as err:
        raise ValueError(err.message(*typed.get(err.key, (err.key, "")))) from None
