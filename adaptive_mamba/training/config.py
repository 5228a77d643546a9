"""TrainConfig: every setting of a training run, as a tree of the library's own config sections.

    model       AdaptiveMambaConfig   adaptive_mamba/config.py
    data        DataConfig            adaptive_mamba/data/shards.py
    scan_order  ScanOrderConfig       adaptive_mamba/pillars/scan_order.py
    masks       MaskConfig            adaptive_mamba/pillars/masks.py
    peft        HybridPeftConfig      adaptive_mamba/pillars/hybrid_peft.py
    optim, train, eval, logging       OptimConfig, TrainSection, EvalDuringTraining, LoggingConfig (here)

The pillars and the data code consume their section as it is: there is no translation layer. A YAML file (nested
sections) and dotted command-line overrides (`masks.block_size=16`) are merged by OmegaConf, then every value is
converted to its field's type and checked by the dataclasses; errors name the key as the user typed it. The flat
keys of the previous release (`mask_block_size=16`) still work for one release: they map to their dotted names
(`DEPRECATED_KEYS`) with one deprecation line per source (config file, command line) that names the new keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adaptive_mamba.config import (AdaptiveMambaConfig, ConfigValueError, Settings, above, at_least, between,
                                   check_settings, setting)
from adaptive_mamba.data.shards import DataConfig
from adaptive_mamba.pillars.hybrid_peft import HybridPeftConfig
from adaptive_mamba.pillars.masks import MaskConfig
from adaptive_mamba.pillars.scan_order import ScanOrderConfig


@dataclass
class OptimConfig(Settings):
    """torch AdamW and the learning-rate schedule (mask logits: masks.learning_rate, same schedule)."""

    lr: float = setting(1e-3, "peak learning rate", check=above(0))
    schedule: str = setting("cosine", "cosine | constant (after the warmup)", choices=("cosine", "constant"))
    min_lr_ratio: float = setting(0.1, "cosine decays to lr * min_lr_ratio", check=between(0, 1))
    warmup_steps: int = setting(0, "linear warmup steps", check=at_least(0))
    weight_decay: float = setting(0.0, "AdamW weight decay of 2-D+ weights (not masks, norms, biases)",
                                  check=at_least(0))
    beta1: float = setting(0.9, "Adam beta1", check=between(0, 1, True))
    beta2: float = setting(0.95, "Adam beta2", check=between(0, 1, True))
    eps: float = setting(1e-8, "Adam epsilon", check=above(0))
    grad_clip: float = setting(1.0, "global gradient-norm clipping (0 disables it)", check=at_least(0))


@dataclass
class TrainSection(Settings):
    """The run: sequence and batch sizes, length, precision and parallelism, checkpoints."""

    init_from: Optional[str] = setting(None, "pretrained model directory (ours / transformers / state-spaces): "
                                       "fine-tune it; the model section is then ignored")
    freeze_base: Optional[bool] = setting(None, "None: freeze the base weights iff init_from is set (train "
                                          "masks/adapters)")
    gradient_checkpointing: Union[bool, str] = setting("auto", "recompute blocks in backward; auto: on when "
                                                       "seq_len >= 2048", choices=(True, False, "auto"))
    seq_len: int = setting(1024, "tokens per sequence", check=at_least(2))
    batch_size: int = setting(1, "sequences per rank per micro-step", check=at_least(1))
    grad_accum_steps: int = setting(1, "micro-steps per optimizer step", check=at_least(1))
    num_epochs: int = setting(1, "epochs over the training split (when max_steps is 0)", check=at_least(1))
    max_steps: int = setting(0, "optimizer steps; > 0 overrides num_epochs", check=at_least(0))
    seed: int = setting(0, "seed of the init, the data order, the mask noise and the random-importance control",
                        check=at_least(0))
    precision: str = setting("fp32", "fp32 | bf16", choices=("fp32", "bf16"))
    zero_stage: int = setting(2, "DeepSpeed ZeRO stage: 0 (plain data parallel) | 1 | 2 | 3",
                              choices=(0, 1, 2, 3))
    offload: str = setting("none", "none | cpu: optimizer state (and with stage 3 the parameters) in CPU memory",
                           choices=("none", "cpu"))
    deepspeed_extra: Optional[str] = setting(None, "JSON file of extra DeepSpeed keys, merged last into the "
                                             "generated config (ds_configs/extra_example.json)")
    chunk_len: int = setting(0, "> 0: run each sequence chunk_len tokens at a time, state carried, exact",
                             check=at_least(0))
    context_parallel: int = setting(1, "ranks sharing one sequence (contiguous pieces); divides the world size",
                                    check=at_least(1))
    output_dir: str = setting("runs/train", "checkpoints, metrics, export (relative: to the working directory)")
    save_every: int = setting(0, "optimizer steps between checkpoints (0: only at the end)", check=at_least(0))
    keep_last: int = setting(2, "checkpoints kept", check=at_least(1))
    resume: str = setting("none", "none | auto | PATH of a checkpoint directory")
    export_at_end: bool = setting(True, "adapters (peft format) and a merged model under output_dir/export")
    verify_ranks: bool = setting(True, "after each pillar decision and at the end: all ranks hold identical "
                                 "parameters, scan orders and allocations (digests, consistency.jsonl)")


@dataclass
class EvalDuringTraining(Settings):
    """Validation during training."""

    every: int = setting(0, "optimizer steps between evals (0: only at start and end)", check=at_least(0))
    batches: int = setting(4, "validation batches per rank per eval", check=at_least(1))


@dataclass
class LoggingConfig(Settings):
    """Console, metrics.jsonl and W&B."""

    wandb: bool = setting(True, "log to W&B")
    project: str = setting("adaptive-mamba", "W&B project")
    run_name: Optional[str] = setting(None, "W&B run name (None: W&B's)")
    wandb_mode: str = setting("auto", "auto (offline unless WANDB_MODE/an API key says otherwise) | online | "
                              "offline | disabled", choices=("auto", "online", "offline", "disabled"))
    every: int = setting(1, "optimizer steps between console/W&B log lines", check=at_least(1))
    progress_bar: bool = setting(True, "tqdm progress bar on rank 0")


# Fields of the library's sections that a training run sets from another key (the user sets that one).
FOLLOWERS = {"model.gradient_checkpointing": "train.gradient_checkpointing", "model.extra": None,
             "peft.seed": "train.seed", "peft.target_modules": "masks.targets"}


@dataclass
class TrainConfig:
    """A training run: one section per part of the system (see the module docstring)."""

    model: AdaptiveMambaConfig = field(default_factory=AdaptiveMambaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scan_order: ScanOrderConfig = field(default_factory=ScanOrderConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    peft: HybridPeftConfig = field(default_factory=HybridPeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalDuringTraining = field(default_factory=EvalDuringTraining)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.peft.seed, self.peft.target_modules = self.train.seed, tuple(self.masks.targets)
        self.model.gradient_checkpointing = self.use_gradient_checkpointing
        peft, masks = self.peft, self.masks
        if peft.enabled and peft.mode == "hybrid" and peft.importance_source == "activations":
            if not masks.enabled:
                raise ValueError("peft.importance_source=activations needs masks.enabled=true (it averages mask "
                                 "activations); use peft.importance_source=saliency without masks")
            if self.first_allocation_step == 0:
                raise ValueError("peft.importance_source=activations has no mask history before the first step: "
                                 "set peft.start_step >= 1 or peft.importance_source=saliency")
        if peft.enabled and peft.mode == "full" and self.train.freeze_base:
            raise ValueError("peft.mode=full trains every weight: drop train.freeze_base=true (or pick peft.mode "
                             "hybrid/lora/ia3)")
        if self.train.chunk_len and self.train.context_parallel > 1:
            raise ValueError("train.chunk_len and train.context_parallel > 1 cannot be combined: each rank runs its "
                             "whole piece in one pass; set train.chunk_len=0, or train.context_parallel=1 to chunk "
                             "on one rank")
        if self.data.dir is None and self.data.source is None:
            raise ValueError("set data.dir (shards built by `python -m data_prep`) or data.source "
                             "(e.g. data.source=stdlib) so the run has data")

    def sections(self) -> Iterator[tuple[str, Any]]:
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    # ------------------------------------------------------------------------------------- derived
    @property
    def use_gradient_checkpointing(self) -> bool:
        if self.train.gradient_checkpointing == "auto":
            return self.train.seq_len >= 2048
        return bool(self.train.gradient_checkpointing)

    @property
    def freeze_base_weights(self) -> bool:
        if self.peft.enabled and self.peft.mode == "full":
            return False
        freeze = self.train.freeze_base
        return self.train.init_from is not None if freeze is None else bool(freeze)

    @property
    def first_allocation_step(self) -> int:
        """The step of the first hybrid allocation (0: from gradient saliency before any training step)."""
        if self.peft.start_step is not None:
            return self.peft.start_step
        return 0 if self.freeze_base_weights else max(1, self.peft.every)

    def model_config(self, vocab_size: int) -> AdaptiveMambaConfig:
        """A copy of the model section for a model trained from scratch (`vocab_size`: the tokenizer's, unless
        model.vocab_size is set)."""
        config = AdaptiveMambaConfig.from_dict(self.model.to_dict())
        config.vocab_size = self.model.vocab_size or vocab_size
        return config

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (what trainer.json and W&B record)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------------------------------- loading
UNIONS = (Union, types.UnionType)     # Optional[int] and int | None
SECTIONS: dict[str, type] = {f.name: get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}

# The flat keys of the previous release and their dotted names (deepspeed_config and nan_policy: see _flat_to_dotted).
DEPRECATED_KEYS: dict[str, str] = {
    **{k: f"model.{k}" for k in ("d_model", "vocab_size", "d_state", "d_conv", "expand")}, "n_layers": "model.n_layer",
    **{k: f"train.{k}" for k in ("init_from", "freeze_base", "gradient_checkpointing", "seq_len", "batch_size",
                                 "grad_accum_steps", "num_epochs", "max_steps", "seed", "precision", "chunk_len",
                                 "context_parallel", "output_dir", "save_every", "keep_last", "resume",
                                 "export_at_end", "verify_ranks")},
    "data_dir": "data.dir", "data_source": "data.source", "tokenizer": "data.tokenizer", "data_max_mb": "data.max_mb",
    "packing": "data.packing", "val_fraction": "data.val_fraction",
    "learning_rate": "optim.lr", "lr_schedule": "optim.schedule", "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2", "adam_eps": "optim.eps",
    **{k: f"optim.{k}" for k in ("min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip")},
    "scan_order": "scan_order.enabled", "scan_update_frequency": "scan_order.every",
    "masking": "masks.enabled", "mask_granularity": "masks.kind", "mask_block_size": "masks.block_size",
    "mask_targets": "masks.targets", "masking_tau": "masks.tau_start", "masking_tau_final": "masks.tau_end",
    "target_sparsity": "masks.target_sparsity", "sparsity_weight": "masks.sparsity_weight",
    "mask_learning_rate": "masks.learning_rate",
    "peft": "peft.enabled", "peft_mode": "peft.mode", "importance_source": "peft.importance_source",
    "importance_threshold": "peft.importance_threshold", "peft_application_ratio": "peft.application_ratio",
    "peft_r": "peft.lora_r", "peft_alpha": "peft.lora_alpha", "peft_reallocation_frequency": "peft.every",
    "peft_start_step": "peft.start_step",
    "eval_every": "eval.every", "eval_batches": "eval.batches",
    "wandb": "logging.wandb", "wandb_project": "logging.project", "wandb_run_name": "logging.run_name",
    "wandb_mode": "logging.wandb_mode", "log_every": "logging.every", "progress_bar": "logging.progress_bar",
}


def config_keys() -> dict[str, dataclasses.Field]:
    """Every settable dotted key of a training config and its dataclass field, in section order."""
    return {f"{name}.{f.name}": f for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f"{name}.{f.name}" not in FOLLOWERS}


def _suggest(key: str) -> str:
    """' (did you mean ...?)' with the closest known dotted key, matching old flat names and bare field names too."""
    keys = config_keys()
    leaves = {k.split(".", 1)[1]: k for k in keys}
    names = {**{k: k for k in keys}, **leaves, **DEPRECATED_KEYS}
    close = difflib.get_close_matches(key, list(names), n=1) or difflib.get_close_matches(
        key.rsplit(".", 1)[-1], list(leaves), n=1)
    return f" (did you mean {names.get(close[0], leaves.get(close[0]))!r}?)" if close else ""


def _check_key(key: str, where: str) -> None:
    if key in FOLLOWERS:
        source = FOLLOWERS[key]
        raise ValueError(f"{where}{key} is not a training setting" + (f": it follows {source}, set that instead"
                                                                       if source else ""))
    if key not in config_keys():
        raise ValueError(f"{where}unknown config key {key!r}{_suggest(key)}. See `launch/train.py --help` or "
                         "docs/configuration.md for every key")


def _ds_config_to_dotted(path: str) -> dict[str, Any]:
    """train.zero_stage / train.offload of an old `deepspeed_config` file (or of its name when it is gone)."""
    file = Path(path)
    if file.is_file():
        zero = json.loads(file.read_text()).get("zero_optimization", {})
        offload = "cpu" if zero.get("offload_optimizer", {}).get("device") == "cpu" else "none"
        return {"train.zero_stage": int(zero.get("stage", 0)), "train.offload": offload}
    match = re.search(r"zero(\d)|cpu_gloo", file.name)
    if not match:
        raise ValueError(f"deepspeed_config={path} is gone and its name gives no ZeRO stage: set train.zero_stage "
                         "(0-3), train.offload and train.deepspeed_extra instead")
    return {"train.zero_stage": int(match.group(1) or 2), "train.offload": "cpu" if "offload" in file.name else "none"}


def _flat_to_dotted(key: str, value: Any, renamed: list[str]) -> dict[str, Any]:
    """{dotted key: value} for one key as written; an old flat name is mapped, and "old -> new" added to `renamed`."""
    if "." in key or key not in DEPRECATED_KEYS and key not in ("deepspeed_config", "nan_policy"):
        return {key: value}
    if key == "nan_policy":
        renamed.append("nan_policy (removed: a non-finite loss always stops the run)")
        return {}
    if key == "deepspeed_config":
        mapped = _ds_config_to_dotted(str(value))
        renamed.append(f"deepspeed_config -> {' '.join(f'{k}={v}' for k, v in mapped.items())}")
        return mapped
    renamed.append(f"{key} -> {DEPRECATED_KEYS[key]}")
    return {DEPRECATED_KEYS[key]: value}


def _warn_renamed(renamed: list[str], where: str) -> None:
    """One deprecation line for all the old flat keys of one source."""
    if renamed:
        warnings.warn(f"{where}flat config keys are deprecated and will be removed in the next release: "
                      f"{', '.join(renamed)}", FutureWarning, stacklevel=3)


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and key in SECTIONS and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield prefix + str(key), value


def _parse_text(hint: Any, text: str, typed: str, where: str) -> Any:
    """A string as the field's type ('none'/'null' -> None, yes/no/true/false -> bool, 'a,b' -> a list). A number
    field keeps an unparsable string: `check_settings` then names the key in its error."""
    options = get_args(hint) if get_origin(hint) in UNIONS else (hint,)
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
    if str in options or int in options or float in options:
        return text
    if any(get_origin(o) in (tuple, list) for o in options):
        return [t.strip() for t in text.split(",") if t.strip()]
    raise ValueError(f"{where}cannot parse {typed}={text!r}: expected {getattr(hint, '__name__', hint)}")


def _coerce(key: str, value: Any, typed: tuple[str, str]) -> Any:
    """`value` (from YAML or OmegaConf's dotlist) converted to the type of field `key`; `typed`: (the key as the
    user wrote it, where), for errors."""
    section, name = key.split(".", 1)
    hint = get_type_hints(SECTIONS[section])[name]
    options = get_args(hint) if get_origin(hint) in UNIONS else (hint,)
    if isinstance(value, str) and set(options) != {str}:
        return _parse_text(hint, value, *typed)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float in options and int not in options:
            return float(value)
        if set(options) in ({str}, {str, type(None)}):
            return str(value)
    if isinstance(value, list) and tuple in {get_origin(o) for o in options}:
        return tuple(value)
    return value


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, ValueError) as err:
        raise ValueError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _override_entries(pairs: list[str]) -> Iterator[tuple[str, str, str]]:
    """(dotted key, the key as typed, value text) of each `key=value`; old flat keys are mapped (one deprecation
    line each), unknown keys raise with a suggestion."""
    renamed: list[str] = []
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not of the form key=value (e.g. masks.block_size=16)")
        typed, text = (part.strip() for part in pair.split("=", 1))
        for dotted, value in _flat_to_dotted(typed.lstrip("-").replace("-", "_"), text, renamed).items():
            _check_key(dotted, "command line: ")
            yield dotted, typed, str(value)
    _warn_renamed(renamed, "command line: ")


def nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{'masks.block_size': 8} -> {'masks': {'block_size': 8}}: dotted keys as the nested YAML of a config file."""
    tree: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, name = dotted.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return tree


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['optim.lr=1e-3', 'masking=false'] -> {'optim.lr': 0.001, 'masks.enabled': False} (typed values)."""
    entries = list(_override_entries(pairs))
    parsed = dict(_flatten(OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, _, v in entries]))))
    return {key: _coerce(key, parsed[key], (typed, "command line: ")) for key, typed, _ in entries}


def load_train_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML/JSON file (optional; nested sections, old flat keys still accepted), merge dotted `key=value`
    overrides over it (OmegaConf), convert each value to its field's type, build and validate the TrainConfig."""
    from_file: dict[str, Any] = {}
    typed: dict[str, tuple[str, str]] = {}          # dotted key -> (the key as the user wrote it, where)
    if path is not None:
        where, renamed = f"config file {path}: ", []
        for key, value in _flatten(_read_file(Path(path))):
            for dotted, v in _flat_to_dotted(key, value, renamed).items():
                _check_key(dotted, where)
                from_file[dotted], typed[dotted] = v, (key, where)
        _warn_renamed(renamed, where)
    entries = list(_override_entries(overrides or []))
    typed.update({dotted: (name, "command line: ") for dotted, name, _ in entries})
    merged = OmegaConf.merge(OmegaConf.create(nest(from_file)),
                             OmegaConf.from_dotlist([f"{dotted}={text}" for dotted, _, text in entries]))
    values = {key: _coerce(key, value, typed[key]) for key, value in _flatten(OmegaConf.to_container(merged))}
    sections = nest(values)
    try:
        for section, cls in SECTIONS.items():
            check_settings(cls, sections.get(section, {}), section + ".")
        return TrainConfig(**{section: cls(**sections.get(section, {})) for section, cls in SECTIONS.items()})
    except ConfigValueError as err:
        raise ValueError(err.message(*typed.get(err.key, (err.key, "")))) from None
