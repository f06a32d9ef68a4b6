"""The attention backend interface every kernel family implements, and the registry that picks them: one by
name, or one per layer from the engine config (MoBA keeps its last ``moba_full_layers`` layers dense)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache

if TYPE_CHECKING:
    from longserve.config import EngineConfig


class AttentionBackend(Protocol):
    """Causal attention of this step's queries over each sequence's cached context.

    ``forward`` stores the new keys/values in the layer's paged cache first, then attends; q is
    ``[tokens, heads, head_dim]``, k and v are ``[tokens, kv_heads, head_dim]`` (GQA: heads % kv_heads == 0),
    and the result is ``[tokens, heads, head_dim]``. ``scale`` multiplies q·k before the softmax.
    """

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def get_backend(name: str) -> AttentionBackend:
    """Backend by name: ``reference`` (masked softmax oracle) or ``dense`` (SDPA + paged decode). MoBA takes
    parameters: ``MobaAttention(chunk_size, topk)``, or ``layer_backends`` for an engine config."""
    from longserve.attention.dense import DenseAttention
    from longserve.attention.reference import ReferenceAttention

    backends: dict[str, type] = {"reference": ReferenceAttention, "dense": DenseAttention}
    if name == "moba":
        raise ValueError(
            "moba needs a chunk size and top-k: use layer_backends(config, ...) or MobaAttention"
        )
    if name not in backends:
        raise ValueError(f"attention must be one of {sorted(backends)}, got {name!r}")
    return backends[name]()


# What build_model accepts: one backend for every layer, or a function from the layer count to one per layer.
BackendsForLayers = AttentionBackend | Callable[[int], Sequence[AttentionBackend]]


def per_layer(backends: BackendsForLayers, num_layers: int) -> list[AttentionBackend]:
    """One backend per layer, checking the count."""
    # Backends are never callable (they expose ``forward``), so a callable is the per-layer function.
    chosen = list(backends(num_layers)) if callable(backends) else [backends] * num_layers
    if len(chosen) != num_layers:
        raise ValueError(f"got {len(chosen)} attention backends for {num_layers} layers")
    return chosen


def layer_backends(config: EngineConfig, num_layers: int) -> list[AttentionBackend]:
    """The backend of each layer for this engine config: ``config.attention`` everywhere, except that MoBA
    keeps the last ``config.moba_full_layers`` layers on dense attention."""
    if config.attention != "moba":
        return [get_backend(config.attention)] * num_layers
    from longserve.attention.dense import DenseAttention
    from longserve.attention.moba import MobaAttention

    sparse = MobaAttention(
        config.moba_chunk_size, config.moba_topk, sink=config.moba_sink, window=config.moba_window
    )
    num_full = min(config.moba_full_layers, num_layers)
    return [sparse] * (num_layers - num_full) + [DenseAttention()] * num_full
