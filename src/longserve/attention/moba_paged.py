"""MoBA's CUDA path over the paged cache: keeping the per-block mean keys current, and calling the Triton
kernels of ``moba_cuda`` for MoBA prompt chunks and decodes."""

from __future__ import annotations

import torch

from longserve.attention import moba_cuda
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.attention.paged_decode import cuda_path_available, paged_layout


def update_gate_keys(
    cache: LayerKVCache, k: torch.Tensor, metadata: AttentionMetadata, chunk_size: int
) -> None:
    """Store the mean key of every MoBA block this step completed (k: this step's new keys, already cached)."""
    if cache.gate_keys is None:
        return
    block = metadata.block_size
    if metadata.num_decodes and cuda_path_available(cache.key):  # MoBA's kernels take this head size
        _close_decode_blocks(cache, metadata, chunk_size)
    else:
        for row, context in enumerate(metadata.decode_context_lens):
            if context % chunk_size == 0:  # the new token closed a block
                slots = metadata.decode_slots[row, context - chunk_size : context]
                _store(cache, cache.key[slots], slots[:1], block)
    for index, span in enumerate(metadata.prefills):
        first = (span.context_len - span.query_len) // chunk_size
        last = span.context_len // chunk_size
        if last <= first:
            continue
        if not span.cached_len:  # the chunk is the whole context: its keys are this step's rows
            keys = k[span.query_start : span.query_start + last * chunk_size]
            starts = metadata.slot_mapping[
                span.query_start : span.query_start + last * chunk_size : chunk_size
            ]
            _store(cache, keys.view(last, chunk_size, *keys.shape[1:]), starts, block)
        else:
            slots = metadata.prefill_slots(index, first * chunk_size, last * chunk_size)
            slots = slots.view(last - first, chunk_size)
            _store(cache, cache.key[slots], slots[:, 0], block)


def _close_decode_blocks(cache: LayerKVCache, metadata: AttentionMetadata, chunk_size: int) -> None:
    """The decode rows' block closings on CUDA: one kernel decides on the device which rows closed a block
    (no host branch on the context lengths, so CUDA graphs capture it) and stores those blocks' means."""
    from longserve.attention.moba_triton import moba_close_blocks_kernel

    tables, lens = metadata.decode_block_tables, metadata.decode_seq_lens
    key, gates = cache.key, cache.gate_keys
    moba_close_blocks_kernel[(metadata.num_decodes, key.shape[1])](
        key, gates, tables, lens, key.stride(0), key.stride(1), gates.stride(0), gates.stride(1),
        tables.stride(0), chunk_size, PAGE_SIZE=metadata.block_size, HEAD_DIM=key.shape[2], BLOCK_N=64,
    )  # fmt: skip


def _store(cache: LayerKVCache, keys: torch.Tensor, first_slots: torch.Tensor, block_size: int) -> None:
    """keys [blocks, chunk, kv_heads, d] (or [chunk, kv_heads, d] for one) -> their means at the first slots' pages."""
    keys = keys if keys.dim() == 4 else keys.unsqueeze(0)
    cache.gate_keys[first_slots // block_size] = torch.mean(keys, dim=1, dtype=torch.float32)


def cached_gates(cache: LayerKVCache, block_table: torch.Tensor, context_len: int, chunk_size: int,
                 block_size: int) -> torch.Tensor:  # fmt: skip
    """[context_len // chunk_size, kv_heads, d] float32: the mean keys of the sequence's complete blocks, as
    ``update_gate_keys`` stored them (at each block's first page; block_table: the sequence's pages)."""
    blocks = context_len // chunk_size
    pages_per_block = chunk_size // block_size
    return cache.gate_keys[block_table[: blocks * pages_per_block : pages_per_block].long()]


def cuda_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerKVCache,
    metadata: AttentionMetadata,
    index: int,
    chunk_size: int,
    topk: int,
    scale: float,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """Prefill span ``index``'s MoBA attention (q, k, v: its rows of the step), gated over the cached mean
    keys: a whole prompt over its own contiguous keys, a chunk after a cached prefix straight from the cache
    through its block table."""
    span, table = metadata.prefills[index], metadata.paged_prefills.block_tables[index]
    gates = cached_gates(cache, table, span.context_len, chunk_size, metadata.block_size)
    if not span.cached_len:
        keys, values = cache.as_stored(k).contiguous(), cache.as_stored(v).contiguous()
        return moba_cuda.moba_prefill_sequence(
            q.contiguous(), keys, values, chunk_size, topk, scale, gates=gates, sink=sink, window=window
        )
    return moba_cuda.moba_prefill_paged(
        q.contiguous(), cache.key, cache.value, table, metadata.block_size, span.context_len, gates,
        chunk_size, topk, scale, sink=sink, window=window,
    )  # fmt: skip


def cuda_decode(
    q: torch.Tensor,
    cache: LayerKVCache,
    metadata: AttentionMetadata,
    chunk_size: int,
    topk: int,
    scale: float,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """All decodes of the step: gate against the cached block means, read only the chosen blocks."""
    tables, context_lens, longest = paged_layout(metadata)
    return moba_cuda.moba_paged_decode(
        q.contiguous(), cache.key, cache.value, tables, context_lens, longest, metadata.block_size,
        cache.gate_keys, chunk_size, topk, scale, sink=sink, window=window,
    )  # fmt: skip
