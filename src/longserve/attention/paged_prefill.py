"""Paged attention for prompt chunks on CUDA: every chunk of a step, whatever its cached prefix, attends its
prefix and itself causally straight from the paged KV cache in one launch (no gathered copy, no mask
tensor). The kernel is ``paged_triton.paged_prefill_kernel``; decode rows keep ``paged_decode``'s split-K."""

from __future__ import annotations

import torch

from longserve.attention.paged_decode import dot_precision, next_pow2

_LOG2E = 1.4426950408889634
TILE_ROWS = 64  # (query, head) rows per program: BLOCK_Q queries x the group's heads (padded)
BLOCK_N = 64  # keys per inner step


def default_tiling(head_dim: int) -> dict:
    """The tiling for ``head_dim``: measured on an H100 (prefill_attention.py, d 64, 8K chunks after 0-120K
    of prefix), 128 rows x 64 keys with 8 warps and 3 stages ran 330-360 TFLOPS against 293-320 for 64 rows,
    4 warps, 2 stages (-17% time at a 120K prefix). Head sizes padded past 128 keep the smaller tile: three
    stages of 256-wide keys and values would not fit in shared memory."""
    if next_pow2(head_dim) <= 128:
        return dict(tile_rows=128, num_warps=8, num_stages=3)
    return dict(tile_rows=TILE_ROWS, num_warps=4, num_stages=2)


def query_block(group: int, tile_rows: int = TILE_ROWS) -> int:
    """Queries per tile for ``group`` query heads per KV head."""
    return max(1, tile_rows // max(1, next_pow2(group)))


def paged_prefill(
    q: torch.Tensor,  # [tokens, heads, d]: the chunks' queries, back to back
    key_cache: torch.Tensor,  # [slots, kv_heads, d], the chunks' own keys already written
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [seqs, max_pages] int32
    query_starts: torch.Tensor,  # [seqs + 1] int32 offsets of each chunk's rows in q
    context_lens: torch.Tensor,  # [seqs] int32: prefix + chunk
    max_query_len: int,  # the longest chunk (sizes the grid)
    page_size: int,
    scale: float,
    *,
    tile_rows: int | None = None,  # the tiling (None: default_tiling); prefill_attention.py sweeps it
    block_n: int = BLOCK_N,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its cached prefix and itself: [tokens, heads, d]."""
    from longserve.attention.paged_triton import paged_prefill_kernel

    tokens, heads, dim = q.shape
    tiling = default_tiling(dim)
    tile_rows = tiling["tile_rows"] if tile_rows is None else tile_rows
    num_warps = tiling["num_warps"] if num_warps is None else num_warps
    num_stages = tiling["num_stages"] if num_stages is None else num_stages
    kv_heads = key_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    block_q = query_block(group, tile_rows)
    grid = (context_lens.numel(), -(-max_query_len // block_q), kv_heads)
    paged_prefill_kernel[grid](
        q, key_cache, value_cache, out, block_tables, query_starts, context_lens,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        scale * _LOG2E,
        GROUP=group, GROUP_PAD=max(1, next_pow2(group)), BLOCK_Q=block_q, BLOCK_N=block_n,
        PAGE=page_size, HEAD_DIM=dim, DIM_PAD=max(16, next_pow2(dim)), DOT_PRECISION=dot_precision(key_cache),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
