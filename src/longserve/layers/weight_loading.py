"""The one weight-loading loop every model family runs: a family says which checkpoint name goes where (its
targets: name -> loader), this checks the names and copies each tensor into place.

Each name is read once, so a lazily dequantized checkpoint never sits in memory whole. A projection's target
(``ShardTarget``) may take the file's low-bit blocks instead of float rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from longserve.layers.linear import ShardTarget
from longserve.loading.gguf_blocks import Blocks

Loader = Callable[[torch.Tensor], None]


def copier(param: torch.Tensor) -> Loader:
    """A loader copying a tensor of exactly ``param``'s shape into it."""

    def copy(tensor: torch.Tensor) -> None:
        if tensor.shape != param.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
        param.copy_(tensor)

    return copy


def load_into(
    weights: Mapping[str, torch.Tensor],
    targets: Mapping[str, Loader],
    dtype: torch.dtype,
    ignorable: Callable[[str], bool],
    blocks_of: Callable[[str], Blocks | None] | None = None,
    skip: Collection[str] = (),
    names: Collection[str] | None = None,
) -> None:
    """Copy every target's tensor from ``weights`` (HF names), cast to ``dtype``.

    Names the model does not use (unless ``ignorable``) and targets the checkpoint lacks raise ``ValueError``,
    as does a tensor of the wrong shape (naming it). ``blocks_of(name)``: the file's low-bit blocks of a
    tensor, handed to projection targets that keep them. ``skip``: targets served some other way (an output
    head kept as blocks), checked present but not copied. ``names``: the part of ``weights`` this model is
    (default: all of it).
    """
    names = set(weights) if names is None else set(names)
    unknown = sorted(name for name in names if name not in targets and not ignorable(name))
    if unknown:
        raise ValueError(f"checkpoint has tensors this model does not use: {unknown[:5]}")
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, load in targets.items():
        try:
            blocks = blocks_of(name) if blocks_of is not None and isinstance(load, ShardTarget) else None
            if blocks is not None:
                load.load_blocks(blocks)
            elif name not in skip:
                load(weights[name].to(dtype))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"tensor {name}: {exc}") from exc
