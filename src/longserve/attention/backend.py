"""The attention backend interface every kernel family implements, and the registry that picks one by name."""

from __future__ import annotations

from typing import Protocol

import torch

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache


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
    """Backend by name: ``reference`` (masked softmax oracle) or ``dense`` (SDPA + paged decode)."""
    from longserve.attention.dense import DenseAttention
    from longserve.attention.reference import ReferenceAttention

    backends: dict[str, type] = {"reference": ReferenceAttention, "dense": DenseAttention}
    if name not in backends:
        raise ValueError(f"attention must be one of {sorted(backends)}, got {name!r}")
    return backends[name]()
