"""AdaptiveMambaConfig: the architecture of a Mamba-1 language model, loadable from and savable to JSON."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, get_args, get_type_hints


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None,
            check: Optional[tuple[Callable[[float], bool], str]] = None, choices: Optional[tuple[Any, ...]] = None
            ) -> Any:
    """A config field with its documentation (for `--help` and docs/configuration.md), and optionally its valid
    numeric range (`check`: a predicate and its wording) or its allowed values (`choices`), both checked by
    `check_settings` so that errors name the key the user typed."""
    meta = {"doc": doc, "check": check, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(n: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= n), f">= {n}"


def above(n: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > n), f"> {n}"


def between(lo: float, hi: float, hi_open: bool = False) -> tuple[Callable[[float], bool], str]:
    return (lambda v: lo <= v < hi if hi_open else lo <= v <= hi), f"in [{lo}, {hi}{')' if hi_open else ']'}"


class ConfigValueError(ValueError):
    """A field with an invalid value; the config loader renames it to the spelling the user typed."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(self.message(key))

    def message(self, typed: str, where: str = "") -> str:
        return f"{where}{typed}={self.value!r} is invalid: it {self.rule}"


def check_settings(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Check `values` (field name -> value, of dataclass `cls`) against each field's declared range or choices;
    raise ConfigValueError naming `prefix + field name`. Integer fields must hold ints, float fields numbers
    (None passes for Optional ones)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, check, choices = values[f.name], f.metadata.get("check"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigValueError(prefix + f.name, value, f"must be one of {list(choices)}")
        if check is None or (value is None and type(None) in get_args(hints[f.name])):
            continue
        integer = int in (hints[f.name], *get_args(hints[f.name]))
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ConfigValueError(prefix + f.name, value, "must be an integer" if integer else "must be a number")
        ok, rule = check
        if not ok(value):
            raise ConfigValueError(prefix + f.name, value, f"must be {rule}")


class Settings:
    """Base of the settings dataclasses: an instance checks every field against the rule its `setting` declares,
    however it is built, so each rule is written once. (The training loader checks the raw values first, to name
    a bad key as the user typed it.)"""

    def __post_init__(self) -> None:
        check_settings(type(self), vars(self), type(self).__name__ + ".")


def check_known_keys(cls_name: str, given: dict[str, Any], known: set[str]) -> None:
    """Raise a ValueError naming every unknown key, with the closest known key as a suggestion."""
    unknown = sorted(set(given) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown {cls_name} key(s): {', '.join(hints)}. Known keys: {', '.join(sorted(known))}")


@dataclass
class AdaptiveMambaConfig(Settings):
    """Mamba-1 architecture (the `model` section of a training config). Sizes default to a small model; those
    of state-spaces/mamba-130m are d_model=768, n_layer=24, vocab_size=50277."""

    d_model: int = setting(64, "width of the residual stream", check=at_least(1))
    n_layer: int = setting(2, "number of Mamba blocks", check=at_least(1))
    vocab_size: Optional[int] = setting(None, "vocabulary size (None: the tokenizer's; must be set to build a model "
                                        "outside training)", check=at_least(2))
    d_state: int = setting(16, "SSM state size per channel", check=at_least(1))
    d_conv: int = setting(4, "width of the causal depthwise convolution", check=at_least(1))
    expand: int = setting(2, "d_inner = expand * d_model", check=at_least(1))
    dt_rank: int | str = setting("auto", '"auto" = ceil(d_model / 16)')
    dt_min: float = setting(0.001, "smallest initial time step")
    dt_max: float = setting(0.1, "largest initial time step")
    dt_init: str = setting("random", "init of dt_proj.weight", choices=("random", "constant"))
    dt_scale: float = setting(1.0, "scale of the dt_proj.weight init")
    dt_init_floor: float = setting(1e-4, "floor of the initial time step")
    conv_bias: bool = setting(True, "bias in the convolution")
    bias: bool = setting(False, "bias of in_proj / out_proj")
    norm_epsilon: float = setting(1e-5, "RMSNorm epsilon")
    residual_in_fp32: bool = setting(True, "keep the residual stream in fp32")
    pad_vocab_size_multiple: int = setting(8, "the embedding rows are padded to a multiple of this",
                                           check=at_least(1))
    tie_embeddings: bool = setting(True, "the LM head shares the embedding matrix")
    initializer_range: float = setting(0.02, "std of the embedding init")
    rescale_prenorm_residual: bool = setting(True, "GPT-2 style rescaling of out_proj at init")
    gradient_checkpointing: bool = setting(False, "recompute each block in backward (in training: set from "
                                           "train.gradient_checkpointing)")
    layer_d_inner: Optional[list[int]] = setting(None, "per-layer channel counts of a channel-pruned export "
                                                 "(None: d_inner)")
    extra: dict[str, Any] = setting(doc="state of the adaptive pillars, saved with the model", factory=dict)

    model_type: ClassVar[str] = "adaptive_mamba"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank != "auto" and not (isinstance(self.dt_rank, int) and self.dt_rank > 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.layer_d_inner is not None and (len(self.layer_d_inner) != self.n_layer
                                               or min(self.layer_d_inner, default=1) < 1):
            raise ValueError(f"layer_d_inner must list n_layer={self.n_layer} channel counts >= 1, "
                             f"got {self.layer_d_inner!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("AdaptiveMambaConfig.vocab_size is None: set it (training sets the tokenizer's)")
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdaptiveMambaConfig":
        data = {k: v for k, v in data.items() if k != "model_type"}
        check_known_keys(cls.__name__, data, {f.name for f in dataclasses.fields(cls)})
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AdaptiveMambaConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
