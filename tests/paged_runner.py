"""PagedRunner: drives one of our models over a single sequence, chunk by chunk, through a paged KV cache."""

from __future__ import annotations

import torch

from longserve.attention.backend import get_backend
from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.loading.checkpoint import load_checkpoint
from longserve.models.registry import build_model

BLOCK = 4


class PagedRunner:
    """Drives our model over one sequence, chunk by chunk, through a paged cache with shuffled blocks."""

    def __init__(self, directory: str, backend: str) -> None:
        checkpoint = load_checkpoint(directory)
        self.model, config = build_model(checkpoint.config, get_backend(backend), torch.float32)
        self.model.load_weights(checkpoint.weights)
        self.model.prepare_for_inference()
        num_blocks = 64
        self.caches = allocate_kv_cache(
            config.num_layers, num_blocks, BLOCK, config.num_kv_heads, config.head_dim, torch.float32
        )
        generator = torch.Generator().manual_seed(0)
        self.block_table = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
        self.computed = 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> torch.Tensor:
        n = len(token_ids)
        metadata = build_attention_metadata([self.block_table], [self.computed], [n], BLOCK)
        positions = torch.arange(self.computed, self.computed + n)
        hidden = self.model(torch.tensor(token_ids), positions, self.caches, metadata)
        self.computed += n
        return self.model.compute_logits(hidden)  # [n, vocab]
