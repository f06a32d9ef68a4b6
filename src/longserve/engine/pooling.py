"""Pooling hidden states into embeddings: cls / mean / last token over a sequence (whole, or arriving in chunks),
and L2 normalisation."""

from __future__ import annotations

import torch

from longserve.loading.pooling_config import PoolingConfig


class ChunkPooler:
    """Pools one sequence whose hidden states arrive chunk by chunk (a long prompt over several forwards)."""

    def __init__(self, config: PoolingConfig) -> None:
        self.config = config
        self._pooled: torch.Tensor | None = None  # [hidden] float32: sum (mean), first row (cls) or last row
        self._count = 0

    def add(self, hidden: torch.Tensor) -> None:
        """The next chunk's hidden states, [chunk_tokens, hidden], in sequence order."""
        mode = self.config.pooling
        if mode == "mean":
            chunk_sum = hidden.float().sum(dim=0)
            self._pooled = chunk_sum if self._pooled is None else self._pooled + chunk_sum
        elif mode == "last":
            self._pooled = hidden[-1].float()
        elif self._pooled is None:  # cls: the first token of the first chunk
            self._pooled = hidden[0].float()
        self._count += hidden.shape[0]

    def result(self) -> torch.Tensor:
        """The sequence's embedding [hidden], normalised if the config says so."""
        if self._pooled is None:
            raise ValueError("no hidden states were pooled")
        pooled = self._pooled / self._count if self.config.pooling == "mean" else self._pooled
        return torch.nn.functional.normalize(pooled, dim=0) if self.config.normalize else pooled


def pool_sequences(hidden: torch.Tensor, seq_lens: list[int], config: PoolingConfig) -> list[torch.Tensor]:
    """One embedding [hidden] per sequence of a flat batch, ``hidden`` [tokens, hidden] in ``seq_lens`` runs."""
    embeddings = []
    for chunk in hidden.split(seq_lens):
        pooler = ChunkPooler(config)
        pooler.add(chunk)
        embeddings.append(pooler.result())
    return embeddings
