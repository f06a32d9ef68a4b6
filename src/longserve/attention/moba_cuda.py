"""MoBA on CUDA: block selection with torch ops, then the Triton kernels of ``moba_triton``.

Prefill inverts the selection. Every (query token, head, chosen block) becomes an entry; entries are sorted by
(KV head, block, query head), so a program attends a tile of up to BLOCK_M gathered queries to one block's keys
with tensor cores. The cost follows the number of chosen blocks however neighbouring tokens choose. The own
block is an entry like the others (its causal mask is the same ``key <= query`` test that every chosen
earlier block passes trivially). Each entry leaves a normalised partial and its log-sum-exp, and a merge
kernel combines a token's entries; queries go in windows so the partials stay bounded in memory. The keys are
a contiguous context (a prompt in one step) or the paged cache read through the sequence's block table (a
chunk after a cached prefix: only the chosen blocks are read, nothing is gathered).

Decode splits each sequence's context at block boundaries: a program reads one block of one KV head from the
paged cache for the group's query heads that chose it, so a block is read once however many heads chose it.
"""

from __future__ import annotations

import math
import os

import torch

from longserve.attention.moba_gating import forced_blocks
from longserve.attention.paged_decode import dot_precision, merge_partials, next_pow2, paged_decode

_LOG2E = 1.4426950408889634
_GATE_TILE = 64  # blocks the gate kernels score at once
_BLOCK_N = 128  # keys per step of the block kernel


def _orderable(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys with the same order; the low 32 bits are left free for a tie-break."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(torch.int64) << 32


def top_blocks(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best eligible blocks along the last axis, ties to the earlier block; -1 where fewer.

    scores: [..., blocks] float32; eligible: broadcastable bool. Returns [..., k] int32.
    """
    blocks = scores.shape[-1]
    take = min(k, blocks)
    out = torch.full((*scores.shape[:-1], k), -1, dtype=torch.int32, device=scores.device)
    if take == 0:
        return out
    scores = scores.masked_fill(~eligible, float("-inf"))
    keys = _orderable(scores) | (blocks - 1 - torch.arange(blocks, device=scores.device))  # earlier wins
    top = keys.topk(take, dim=-1, sorted=False).indices  # [..., take]
    ok = torch.gather(eligible.expand_as(scores), -1, top)
    out[..., :take] = torch.where(ok, top, -1).to(torch.int32)
    return out


def gate_keys(k: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean key of every complete block: k [seq, kv_heads, d] -> [blocks, kv_heads, d] float32."""
    blocks = k.shape[0] // chunk_size
    return k[: blocks * chunk_size].view(blocks, chunk_size, *k.shape[1:]).float().mean(1)


def select_prefill_blocks(
    q: torch.Tensor,
    positions: torch.Tensor,
    gates: torch.Tensor,
    chunk_size: int,
    topk: int,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """[rows, heads, topk] int32: the topk-1 chosen earlier blocks of each query (-1 = none), own block last.

    ``positions`` are consecutive (row i sits at positions[0] + i). On CUDA one Triton kernel scores in float32
    accuracy (skipping blocks no row may choose) and picks the blocks as it goes; torch.topk is ~20x slower
    at these shapes.
    """
    rows, heads, dim = q.shape
    kv_heads, blocks = gates.shape[1], gates.shape[0]
    group = heads // kv_heads
    chosen = torch.empty(rows, heads, topk, dtype=torch.int32, device=q.device)
    if rows == 0:
        return chosen
    if q.is_cuda:
        from longserve.attention.moba_triton import moba_prefill_gate_kernel

        picks = next_pow2(max(topk - 1, 1))
        # Each program keeps its rows' running lists, [block_r, picks] values and ids, in registers.
        block_r = 64 if picks <= 16 else 32
        moba_prefill_gate_kernel[(-(-rows // block_r), heads)](
            q, gates, chosen, int(positions[0]), rows, blocks, chunk_size, int(sink), window,
            q.stride(0), q.stride(1), gates.stride(0), gates.stride(1),
            GROUP=group, HEAD_DIM=dim, TOPK=topk, KP=picks, BLOCK_R=block_r, BLOCK_B=_GATE_TILE,
            PRECISION="ieee" if _interpreting() else "tf32x3", num_warps=4,
        )  # fmt: skip
        return chosen
    own = (positions // chunk_size).to(torch.int32)  # [rows]
    chosen[:, :, -1] = own[:, None]
    if topk == 1:
        return chosen
    eligible = torch.arange(blocks, device=q.device)[None, None, :] < own[:, None, None]  # [rows, 1, blocks]
    forced = forced_blocks(positions, blocks, chunk_size, sink, window)  # [rows, blocks] or None
    step = max(1, (1 << 27) // max(1, heads * blocks))  # bound the [rows, heads, blocks] score tensors
    for r0 in range(0, rows, step):
        qs = q[r0 : r0 + step].float().view(-1, kv_heads, group, dim)
        scores = torch.einsum("rkgd,nkd->rkgn", qs, gates).reshape(qs.shape[0], heads, blocks)
        if forced is not None:
            scores = scores.masked_fill(forced[r0 : r0 + step, None, :], float("inf"))
        chosen[r0 : r0 + step, :, :-1] = top_blocks(scores, eligible[r0 : r0 + step], topk - 1)
    return chosen


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _window_budget(device: torch.device) -> int:
    """Bytes one query window's entries may take: up to 8 GiB (fewer, fuller tiles per block), and at most half
    of what the device has free now, so a long prompt in one step narrows its windows instead of running out
    of memory beside a KV cache sized to the GPU."""
    if device.type != "cuda":
        return 8 << 30
    free, _ = torch.cuda.mem_get_info(device)
    # Memory the caching allocator holds but nothing uses is free to this window too.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(8 << 30, (free + cached) // 2)


def _tiles(
    keys: torch.Tensor, num_groups: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each run of equal sorted keys into tiles of at most block_m entries: (group, start, end) per tile."""
    # keys are sorted: each group's start is a binary search (a histogram would contend on atomics)
    bounds = torch.searchsorted(keys, torch.arange(num_groups + 1, device=keys.device, dtype=keys.dtype))
    group_start, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    tiles_per_group = (counts + block_m - 1) // block_m
    tile_offset = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    num_tiles = int(tiles_per_group.sum())
    tile_group = torch.repeat_interleave(
        torch.arange(num_groups, device=keys.device), tiles_per_group, output_size=num_tiles
    )
    rank = torch.arange(num_tiles, device=keys.device) - tile_offset[tile_group]
    start = group_start[tile_group] + rank * block_m
    end = torch.minimum(start + block_m, group_start[tile_group] + counts[tile_group])
    return tile_group.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def moba_prefill_sequence(
    q: torch.Tensor,  # [queries, heads, d]: positions q_start .. q_start + queries - 1 of the sequence
    k: torch.Tensor,  # [seq, kv_heads, d]: the whole context, seq = q_start + queries
    v: torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    out: torch.Tensor | None = None,  # [queries, heads, d] contiguous, written in place
    gates: torch.Tensor | None = None,  # [blocks, kv_heads, d] float32 mean keys; None: computed from k
    use_tma: bool | None = None,  # None: on Hopper and newer (bulk tensor copies; ~5% faster at 1M tokens)
    sink: bool = False,
    window: int = 0,
    **tiling,
) -> torch.Tensor:
    """MoBA attention of the last ``len(q)`` positions of one sequence over its contiguous context, on CUDA
    (``sink``, ``window``: the blocks every query attends, ``moba_gating.forced_blocks``; ``tiling``: the
    keywords of ``_attend_chosen_blocks``)."""
    seq, kv_heads, dim = k.shape
    block_n = tiling.get("block_n", _BLOCK_N)
    k_desc = v_desc = None
    if use_tma is None:
        use_tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    if use_tma:  # Hopper bulk copies of [block_n, d] tiles out of the [seq, kv_heads * d] key/value rows
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k.view(seq, kv_heads * dim), [block_n, dim])
        v_desc = TensorDescriptor.from_tensor(v.view(seq, kv_heads * dim), [block_n, dim])
    gates = gate_keys(k, chunk_size) if gates is None else gates
    return _attend_chosen_blocks(
        q,
        k,
        v,
        seq,
        gates,
        chunk_size,
        topk,
        scale,
        out,
        sink,
        window,
        descriptors=(k_desc, v_desc),
        **tiling,
    )


def moba_prefill_paged(
    q: torch.Tensor,  # [queries, heads, d]: the last ``queries`` positions of a context of ``context_len``
    key_cache: torch.Tensor,  # [slots, kv_heads, d]: the paged cache, slot = page * page_size + offset
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [pages] int32: the sequence's pages, in order
    page_size: int,
    context_len: int,
    gates: torch.Tensor,  # [context_len // chunk_size, kv_heads, d] float32: the complete blocks' mean keys
    chunk_size: int,
    topk: int,
    scale: float,
    out: torch.Tensor | None = None,
    sink: bool = False,
    window: int = 0,
    **tiling,
) -> torch.Tensor:
    """A prompt chunk's MoBA attention read straight from the paged cache: the queries gate over ``gates``
    and the kernel reads only the chosen blocks' keys and values through ``block_table`` (no gathered copy of
    the prefix)."""
    return _attend_chosen_blocks(
        q, key_cache, value_cache, context_len, gates, chunk_size, topk, scale, out, sink, window,
        paging=(block_table, page_size), **tiling,
    )  # fmt: skip


def _attend_chosen_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: int,
    gates: torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    out: torch.Tensor | None,
    sink: bool,
    window: int,
    *,
    descriptors: tuple = (None, None),  # TMA descriptors of contiguous k and v
    paging: tuple[torch.Tensor | None, int] = (None, 0),  # (block table, page size) of a paged cache
    window_tokens: int | None = None,
    partial_dtype: torch.dtype | None = None,  # None: q's dtype (bf16 partials halve the merge's traffic)
    block_m: int = 128,
    block_n: int = _BLOCK_N,
    num_warps: int = 8,
    num_stages: int = 3,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """Gate the queries (positions seq - len(q) ..), attend each (query, head, chosen block) entry in tiles of
    block_m entries per block, and merge every query's partials; queries go in windows of ``window_tokens``."""
    from longserve.attention.moba_triton import moba_block_attention_kernel

    queries, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q_start = seq - queries
    out = torch.empty_like(q) if out is None else out
    partial_dtype = partial_dtype or q.dtype
    num_chunks = math.ceil(seq / chunk_size)
    num_groups = kv_heads * num_chunks * group
    if window_tokens is None:
        # Per (query, head, chosen block) entry: its partial, its log-sum-exp and ~5 int64 sort/index words.
        entry_bytes = dim * partial_dtype.itemsize + 4 + 5 * 8
        window_tokens = max(1024, _window_budget(q.device) // (heads * topk * entry_bytes))
    k_desc, v_desc = descriptors
    block_table, page_size = paging
    head_ids = torch.arange(heads, device=q.device)
    head_key = ((head_ids // group) * num_chunks * group + head_ids % group).to(torch.int32)  # [heads]
    for w0 in range(0, queries, window_tokens):
        rows = min(window_tokens, queries - w0)
        positions = torch.arange(q_start + w0, q_start + w0 + rows, device=q.device)
        chosen = select_prefill_blocks(
            q[w0 : w0 + rows], positions, gates, chunk_size, topk, sink, window
        )  # [rows, heads, topk]
        keys = head_key[None, :, None] + chosen * group  # [rows, heads, topk] group id per entry
        # No pick (-1) sorts past every group, so no tile holds it: no count of the picks comes back to the host.
        keys = torch.where(chosen >= 0, keys, num_groups)
        sorted_keys, dst = torch.sort(keys.flatten(), stable=True)  # dst: entries in (row, head, slot) order
        pos = (q_start + w0 + dst // (heads * topk)).to(torch.int32)
        tile_group, tile_start, tile_end = _tiles(sorted_keys, num_groups, block_m)
        o_part = torch.empty(rows * heads * topk, dim, dtype=partial_dtype, device=q.device)
        lse_part = torch.full((rows * heads * topk,), float("-inf"), dtype=torch.float32, device=q.device)
        if tile_group.numel():
            moba_block_attention_kernel[(tile_group.numel(),)](
                q, k, v, o_part, lse_part, tile_group, tile_start, tile_end, pos, dst,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                q_start, num_chunks, chunk_size, seq, scale * _LOG2E, k_desc, v_desc, block_table,
                GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=k_desc is not None,
                PAGE_SIZE=page_size, WARP_SPECIALIZE=warp_specialize, DOT_PRECISION=dot_precision(q),
                num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
        merge_partials(o_part, lse_part, out[w0 : w0 + rows], rows * heads, topk)
    return out


def moba_prefill(
    q: torch.Tensor,  # [total_tokens, heads, d]
    k: torch.Tensor,  # [total_tokens, kv_heads, d]
    v: torch.Tensor,
    seq_lens: list[int],
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    **options,
) -> torch.Tensor:
    """Packed sequences, each attending only to itself: the CUDA counterpart of the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    start = 0
    for length in seq_lens:
        rows = slice(start, start + length)
        moba_prefill_sequence(q[rows], k[rows], v[rows], chunk_size, topk, scale, out=out[rows], **options)
        start += length
    return out


def select_decode_blocks(
    q: torch.Tensor,  # [batch, heads, d]
    gate_cache: torch.Tensor,  # [num_pages, kv_heads, d] float32: a complete block's mean key at its first page
    block_tables: torch.Tensor,  # [batch, max_pages] int32
    context_lens: torch.Tensor,  # [batch] int32, the new token included
    max_context: int,
    page_size: int,
    chunk_size: int,
    topk: int,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """[batch, kv_heads, splits] int32 bitmask of the query heads of each group that chose each block."""
    batch, heads, dim = q.shape
    kv_heads = gate_cache.shape[1]
    group = heads // kv_heads
    splits = -(-max_context // chunk_size)
    blocks = (max_context - 1) // chunk_size  # most complete earlier blocks of any sequence
    pages_per_block = chunk_size // page_size
    if q.is_cuda:
        from longserve.attention.moba_triton import moba_decode_gate_kernel

        chosen = torch.zeros(batch, kv_heads, splits, dtype=torch.int32, device=q.device)
        moba_decode_gate_kernel[(batch, kv_heads)](
            q, gate_cache, block_tables, context_lens, chosen,
            q.stride(0), q.stride(1), gate_cache.stride(0), gate_cache.stride(1), block_tables.stride(0),
            kv_heads, splits, chunk_size, pages_per_block, int(sink), window,
            GROUP=group, TOPK=topk, KP=next_pow2(max(topk - 1, 1)), HEAD_DIM=dim,
            BLOCK_H=max(16, next_pow2(group)), BLOCK_B=_GATE_TILE,
            PRECISION="ieee" if _interpreting() else "tf32x3",
        )  # fmt: skip
        return chosen
    own = (context_lens.long() - 1) // chunk_size  # [batch]
    onehot = torch.zeros(batch, kv_heads, group, splits + 1, dtype=torch.int32, device=q.device)
    if topk > 1 and blocks:
        first_pages = block_tables[:, : blocks * pages_per_block : pages_per_block].long()  # [batch, blocks]
        gates = gate_cache[first_pages]  # [batch, blocks, kv_heads, d]
        scores = torch.einsum("bkgd,bnkd->bkgn", q.float().view(batch, kv_heads, group, dim), gates)
        eligible = torch.arange(blocks, device=q.device)[None, :] < own[:, None]  # [batch, blocks]
        forced = forced_blocks(context_lens.long() - 1, blocks, chunk_size, sink, window)  # [batch, blocks]
        if forced is not None:
            scores = scores.masked_fill(forced[:, None, None, :], float("inf"))
        top = top_blocks(scores, eligible[:, None, None, :], topk - 1).long()  # [batch, kv, group, topk-1]
        onehot.scatter_(3, torch.where(top >= 0, top, splits), 1)
    head_bits = 1 << torch.arange(group, device=q.device, dtype=torch.int32)  # [group]
    bits = (onehot[..., :splits] * head_bits[None, None, :, None]).sum(2, dtype=torch.int32)
    own_bits = torch.zeros_like(bits).scatter_(
        2, own[:, None, None].expand(batch, kv_heads, 1), (1 << group) - 1
    )
    return bits | own_bits


def moba_paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context: int,
    page_size: int,
    gate_cache: torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """MoBA decode: gate against the cached block means, choose blocks, read only those blocks."""
    chosen = select_decode_blocks(
        q, gate_cache, block_tables, context_lens, max_context, page_size, chunk_size, topk, sink, window
    )
    return paged_decode(
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        max_context,
        page_size,
        chunk_size,
        scale,
        chosen,
    )
