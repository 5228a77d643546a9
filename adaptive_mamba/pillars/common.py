"""What the three pillars share: the mixer projections they act on and how to find them under wrappers.

Each projection has one side indexed by the d_inner channels (the channels pillar 1 permutes and pillar 2's
structured masks remove in blocks):

    in_proj  (d_model -> 2 d_inner): output side      x_proj (d_inner -> dt_rank + 2N): input side
    dt_proj  (dt_rank -> d_inner):   output side      out_proj (d_inner -> d_model):    input side
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Optional

from torch import nn

if TYPE_CHECKING:
    from adaptive_mamba.model import AdaptiveMambaForCausalLM

PROJECTIONS: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")
DEFAULT_TARGETS: tuple[str, ...] = ("in_proj", "x_proj", "out_proj")   # masked and adapted by default
D_INNER_SIDE: dict[str, str] = {"in_proj": "out", "x_proj": "in", "dt_proj": "out", "out_proj": "in"}


def check_projections(names: Iterable[str], what: str) -> tuple[str, ...]:
    """Validate a list of projection names (e.g. a config's targets); returns them as a tuple."""
    names = tuple(names)
    bad = [n for n in names if n not in PROJECTIONS]
    if bad or not names:
        raise ValueError(f"{what} must be a non-empty subset of {list(PROJECTIONS)}, got {list(names)}")
    return names


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost layer under peft adapter wrappers (a wrapper keeps the wrapped layer in `.base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def projection_name(layer: int, proj: str) -> str:
    """Canonical module name of a projection, e.g. 'blocks.0.mixer.in_proj' (as in model.named_modules())."""
    return f"blocks.{layer}.mixer.{proj}"


def iter_projections(model: "AdaptiveMambaForCausalLM", projs: Iterable[str] = PROJECTIONS,
                     layers: Optional[Iterable[int]] = None) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(canonical name, mixer, module as attached (maybe a peft wrapper), projection kind), in layer order."""
    projs = tuple(projs)
    wanted = range(len(model.blocks)) if layers is None else sorted(set(layers))
    for i in wanted:
        if not 0 <= i < len(model.blocks):
            raise ValueError(f"layer index {i} out of range: the model has {len(model.blocks)} layers")
        mixer = model.blocks[i].mixer
        for proj in projs:
            yield projection_name(i, proj), mixer, getattr(mixer, proj), proj


def resolve_module(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) for a dotted module name; raises a clear error when it does not exist."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        return parent, attr, getattr(parent, attr)
    except AttributeError as err:
        raise ValueError(f"module {name!r} does not exist in the model ({err})") from err
