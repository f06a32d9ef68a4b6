"""The CUDA path over the paged cache: keeping MoBA's per-block mean keys current, and calling the Triton
kernels of ``moba_cuda`` for MoBA prompt chunks and decodes, and for dense decodes (every split chosen)."""

from __future__ import annotations

import torch

from longserve.attention import moba_cuda
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache


def cuda_path_available(q: torch.Tensor) -> bool:
    """Triton kernels run for CUDA tensors whose head size is a power of two from 16 to 256."""
    if not q.is_cuda or q.shape[-1] not in (16, 32, 64, 128, 256):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def update_gate_keys(
    cache: LayerKVCache, k: torch.Tensor, metadata: AttentionMetadata, chunk_size: int
) -> None:
    """Store the mean key of every MoBA block this step completed (k: this step's new keys, already cached)."""
    if cache.gate_keys is None:
        return
    block = metadata.block_size
    for row, context in enumerate(metadata.decode_context_lens):
        if context % chunk_size == 0:  # the new token closed a block
            slots = metadata.decode_slots[row, context - chunk_size : context]
            _store(cache, cache.key[slots], slots[:1], block)
    for span in metadata.prefills:
        first = (span.context_len - span.query_len) // chunk_size
        last = span.context_len // chunk_size
        if last <= first:
            continue
        if span.context_slots is None:  # the chunk is the whole context: its keys are this step's rows
            keys = k[span.query_start : span.query_start + last * chunk_size]
            starts = metadata.slot_mapping[
                span.query_start : span.query_start + last * chunk_size : chunk_size
            ]
            _store(cache, keys.view(last, chunk_size, *keys.shape[1:]), starts, block)
        else:
            slots = span.context_slots[first * chunk_size : last * chunk_size].view(last - first, chunk_size)
            _store(cache, cache.key[slots], slots[:, 0], block)


def _store(cache: LayerKVCache, keys: torch.Tensor, first_slots: torch.Tensor, block_size: int) -> None:
    """keys [blocks, chunk, kv_heads, d] (or [chunk, kv_heads, d] for one) -> their means at the first slots' pages."""
    keys = keys if keys.dim() == 4 else keys.unsqueeze(0)
    cache.gate_keys[first_slots // block_size] = torch.mean(keys, dim=1, dtype=torch.float32)


def cuda_prefill(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk_size: int, topk: int, scale: float
) -> torch.Tensor:
    """One sequence's prompt chunk (the last len(q) positions of its context) through the block kernel."""
    return moba_cuda.moba_prefill_sequence(
        q.contiguous(), keys.contiguous(), values.contiguous(), chunk_size, topk, scale
    )


def _paged_layout(metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block tables [batch, pages] and context lengths [batch] (int32, built once per step), and the longest."""
    return metadata.decode_block_tables, metadata.decode_seq_lens, metadata.max_decode_len


def cuda_dense_decode(
    q: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Full attention of every decode over its paged context, split into pieces of at most 1024 keys so
    long contexts spread over the whole GPU."""
    tables, context_lens, longest = _paged_layout(metadata)
    sized_for = metadata.split_context or longest
    split = min(1024, max(metadata.block_size, 16 * -(-sized_for // (16 * 8))))  # >= 8 splits when short
    return moba_cuda.paged_decode(
        q.contiguous(),
        cache.key,
        cache.value,
        tables,
        context_lens,
        longest,
        metadata.block_size,
        split,
        scale,
    )


def cuda_decode(
    q: torch.Tensor,
    cache: LayerKVCache,
    metadata: AttentionMetadata,
    chunk_size: int,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """All decodes of the step: gate against the cached block means, read only the chosen blocks."""
    tables, context_lens, longest = _paged_layout(metadata)
    return moba_cuda.moba_paged_decode(
        q.contiguous(), cache.key, cache.value, tables, context_lens, longest, metadata.block_size,
        cache.gate_keys, chunk_size, topk, scale,
    )  # fmt: skip
