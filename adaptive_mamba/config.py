"""AdaptiveMambaConfig: the architecture of a Mamba-1 language model, loadable from and savable to JSON."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional


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
class AdaptiveMambaConfig:
    """Mamba-1 architecture. Defaults are those of state-spaces/mamba-130m except the layer count and vocab."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"          # "auto" = ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"              # "random" or "constant" init of dt_proj.weight
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False                   # bias of in_proj / out_proj
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    gradient_checkpointing: bool = False  # recompute each block in backward (training, long sequences)
    layer_d_inner: Optional[list[int]] = None  # per-layer channel counts of a channel-pruned export (None: d_inner)
    extra: dict[str, Any] = field(default_factory=dict)  # state of the adaptive pillars, saved with the model

    model_type: ClassVar[str] = "adaptive_mamba"

    def __post_init__(self) -> None:
        if self.dt_rank != "auto" and not (isinstance(self.dt_rank, int) and self.dt_rank > 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        if self.layer_d_inner is not None and (len(self.layer_d_inner) != self.n_layer
                                               or min(self.layer_d_inner, default=1) < 1):
            raise ValueError(f"layer_d_inner must list n_layer={self.n_layer} channel counts >= 1, "
                             f"got {self.layer_d_inner!r}")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
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
