"""Triton kernels for MoBA on CUDA: gathered-query block attention and the gates (block selection).

The gates score blocks a tile at a time and keep each query's best ``topk - 1`` in registers, a tile's block
entering only where it beats the worst kept (``_insert_top``), so any number of blocks is scored without
writing a score tensor.

The log-sum-exp merge and the paged split decode that MoBA shares with dense attention are in
``paged_triton``.

Importing this module needs Triton; ``moba_cuda`` imports it only when it runs on a GPU. Scores are kept in
base-2 units (q·k · scale · log2 e) so the softmax uses ``exp2``; every log-sum-exp written here is base 2.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_BLOCK = tl.constexpr(1 << 30)  # a block id past any sequence's: "none" in the running top lists


@triton.jit
def moba_block_attention_kernel(
    Q,  # [query_rows, heads, HEAD_DIM]; query row = position - q_offset
    K,  # [seq_len, kv_heads, HEAD_DIM]; with PAGE_SIZE, the paged cache [slots, kv_heads, HEAD_DIM]
    V,
    O_part,  # [entries_in_window, HEAD_DIM] normalised partial outputs, indexed by entry_dst
    LSE_part,  # [entries_in_window] base-2 log-sum-exp of each partial
    tile_group,  # [tiles] group id = (kv_head * num_chunks + chunk) * GROUP + head_in_group
    tile_start,  # [tiles] first sorted entry of the tile
    tile_end,  # [tiles] one past its last sorted entry
    entry_pos,  # [entries] query position of each sorted entry
    entry_dst,  # [entries] where its partial goes in O_part / LSE_part
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    q_offset,
    num_chunks,
    chunk_size,
    seq_len,
    scale_log2,
    K_desc,  # TensorDescriptor over K viewed as [seq_len, kv_heads * HEAD_DIM] when USE_TMA, else unused
    V_desc,
    Block_table,  # [pages] int32: the sequence's cache pages when PAGE_SIZE > 0, else unused
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # > 0: K, V are the paged cache; position p is at table[p // PAGE] * PAGE + p % PAGE
    WARP_SPECIALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact mode), "tf32" otherwise (unused for bf16)
):
    """One tile: up to BLOCK_M (query, head) entries that chose the same block, attended to that block."""
    tile = tl.program_id(0)
    group = tl.load(tile_group + tile)
    start = tl.load(tile_start + tile)
    end = tl.load(tile_end + tile)
    head_in_group = group % GROUP
    chunk = (group // GROUP) % num_chunks
    kv_head = group // (GROUP * num_chunks)
    head = kv_head * GROUP + head_in_group

    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    pos = tl.load(entry_pos + rows, mask=row_ok, other=0)
    last_pos = tl.max(tl.where(row_ok, pos, 0), axis=0)
    first_pos = tl.min(tl.where(row_ok, pos, 2147483647), axis=0)
    pos = tl.where(row_ok, pos, last_pos)  # padding rows copy a real one: no all-masked row, no NaN
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (pos - q_offset).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + dims[None, :])  # [BLOCK_M, D]

    kv_start = chunk * chunk_size
    kv_stop = tl.minimum(tl.minimum(kv_start + chunk_size, last_pos + 1), seq_len)
    # Keys at or before first_pos are visible to every row of the tile: no causal mask needed there.
    unmasked_stop = kv_start + ((tl.minimum(first_pos + 1, kv_stop) - kv_start) // BLOCK_N) * BLOCK_N
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in tl.range(kv_start, unmasked_stop, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        key_rows = _key_rows(Block_table, n0 + tl.arange(0, BLOCK_N), kv_stop, PAGE_SIZE)
        if USE_TMA:
            k = K_desc.load([n0, kv_head * HEAD_DIM])  # [BLOCK_N, D]
        else:
            k = tl.load(k_base + key_rows[:, None] * stride_kt + dims[None, :])
        s = tl.dot(
            q, tl.trans(k), input_precision=DOT_PRECISION
        )  # [BLOCK_M, BLOCK_N], unscaled: the scale folds into one FMA below
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        p = tl.exp2(s * scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = V_desc.load([n0, kv_head * HEAD_DIM])
        else:
            v = tl.load(v_base + key_rows[:, None] * stride_vt + dims[None, :])
        acc = tl.dot(
            p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION
        )  # accumulate inside the matrix instruction
        m_i = m_new
    for n0 in range(unmasked_stop, kv_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_stop
        key_rows = _key_rows(Block_table, cols, kv_stop, PAGE_SIZE)
        if USE_TMA:  # rows past the end read as zeros; rows past kv_stop are masked below
            k = K_desc.load([n0, kv_head * HEAD_DIM])
        else:
            k = tl.load(
                k_base + key_rows[:, None] * stride_kt + dims[None, :], mask=col_ok[:, None], other=0.0
            )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where((cols[None, :] <= pos[:, None]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = V_desc.load([n0, kv_head * HEAD_DIM])
        else:
            v = tl.load(
                v_base + key_rows[:, None] * stride_vt + dims[None, :], mask=col_ok[:, None], other=0.0
            )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    dst = tl.load(entry_dst + rows, mask=row_ok, other=0)
    tl.store(
        O_part + dst[:, None] * HEAD_DIM + dims[None, :],
        out.to(O_part.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE_part + dst, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _key_rows(Block_table, cols, kv_stop, PAGE_SIZE: tl.constexpr):
    """int64 rows of K/V holding positions ``cols``: the positions themselves, or their paged cache slots
    (positions from ``kv_stop`` on are not the sequence's: their table entries are not read)."""
    if PAGE_SIZE > 0:
        pages = tl.load(Block_table + cols // PAGE_SIZE, mask=cols < kv_stop, other=0)
        return pages.to(tl.int64) * PAGE_SIZE + cols % PAGE_SIZE
    return cols.to(tl.int64)


@triton.jit
def _insert_top(s, blocks, top_v, top_i, PICKS: tl.constexpr, KP: tl.constexpr):
    """The running lists (``top_v``, ``top_i``) [R, KP], unordered, after a tile of scores ``s`` [R, BB] (block
    ids ``blocks`` [BB], all later than any in the lists): each list holds its row's PICKS best by score, the
    earlier block winning a tie, as one pass over every block would keep. A tile's block enters only if it
    beats the row's worst kept score (equal is not enough: it is later), so once the lists are full a tile
    costs as many rounds as its rows' most entering blocks, not PICKS rounds. -inf means none."""
    slots = tl.arange(0, KP)
    usable = slots[None, :] < PICKS  # [1, KP]: the list's first PICKS slots hold it
    worst = tl.min(tl.where(usable, top_v, float("inf")), 1)  # [R]
    enters = s > worst[:, None]
    while tl.max(tl.sum(enters.to(tl.int32), 1)) > 0:
        best = tl.max(tl.where(enters, s, float("-inf")), 1)  # [R] each row's best entering score
        row_enters = best > worst
        pick = tl.min(tl.where(enters & (s == best[:, None]), blocks[None, :], NO_BLOCK), 1)  # earliest
        # The worst kept entry leaves: the lowest score, the latest block among equals (empty slots first).
        at_worst = usable & (top_v == worst[:, None])
        leaving = tl.max(tl.where(at_worst, top_i, -1), 1)
        slot = tl.max(tl.where(at_worst & (top_i == leaving[:, None]), slots[None, :], -1), 1)
        replace = row_enters[:, None] & (slots[None, :] == slot[:, None])
        top_v = tl.where(replace, best[:, None], top_v)
        top_i = tl.where(replace, pick[:, None], top_i)
        s = tl.where(row_enters[:, None] & (blocks[None, :] == pick[:, None]), float("-inf"), s)
        worst = tl.min(tl.where(usable, top_v, float("inf")), 1)
        enters = s > worst[:, None]
    return top_v, top_i


@triton.jit
def _best_first(top_v, top_i, PICKS: tl.constexpr, KP: tl.constexpr):
    """The lists of ``_insert_top`` in order: best score first, the earlier block first among equals."""
    slots = tl.arange(0, KP)
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(top_i.shape, NO_BLOCK, tl.int32)
    top_v = tl.where(slots[None, :] < PICKS, top_v, float("-inf"))
    for j in tl.static_range(PICKS):
        best = tl.max(top_v, 1)  # [R]
        pick = tl.min(tl.where(top_v == best[:, None], top_i, NO_BLOCK), 1)
        new_v = tl.where(slots[None, :] == j, best[:, None], new_v)
        new_i = tl.where(slots[None, :] == j, pick[:, None], new_i)
        top_v = tl.where(top_i == pick[:, None], float("-inf"), top_v)
    return new_v, new_i


@triton.jit
def _gate_rule(s, blocks, position, sink, window, chunk_size):
    """Scores [R, BB] of the blocks ``blocks`` for queries at ``position`` [R]: -inf for blocks at or after a
    query's own block (not eligible), +inf for the forced ones (``moba_gating.forced_blocks``)."""
    own = position // chunk_size
    first_window = tl.where(window > 0, tl.maximum(position - window + 1, 0) // chunk_size, own)
    forced = ((blocks[None, :] == 0) & (sink != 0)) | (blocks[None, :] >= first_window[:, None])
    s = tl.where(forced, float("inf"), s)
    return tl.where(blocks[None, :] < own[:, None], s, float("-inf"))


@triton.jit
def moba_prefill_gate_kernel(
    Q,  # [rows, heads, HEAD_DIM]: consecutive positions from first_pos
    Gates,  # [num_blocks, kv_heads, HEAD_DIM] float32 mean keys of the complete blocks
    Chosen,  # [rows, heads, TOPK] int32 out: the TOPK-1 best earlier blocks (-1 = none), own block last
    first_pos,
    num_rows,
    num_blocks,
    chunk_size,
    sink,  # 1: block 0 is always chosen (moba_gating.forced_blocks)
    window,  # tokens: the blocks holding the last ``window`` up to the query are always chosen; 0 = off
    stride_qt,
    stride_qh,
    stride_gb,
    stride_gh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,  # power of two >= TOPK - 1: the running list's width
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,  # "tf32x3" (float32 accuracy on tensor cores) on GPUs, "ieee" in the interpreter
):
    """Gating fused for BLOCK_R queries of one head: q·gate over tiles of BLOCK_B blocks, each tile merged into
    a running top list in registers; no score tensor is written, and blocks no row may choose are skipped."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    ok = rows < num_rows
    position = first_pos + rows
    out = Chosen + (rows.to(tl.int64) * (tl.num_programs(1) * TOPK) + head * TOPK)
    tl.store(out + TOPK - 1, position // chunk_size, mask=ok)
    if TOPK > 1:
        last_own = (first_pos + tl.minimum((tl.program_id(0) + 1) * BLOCK_R, num_rows) - 1) // chunk_size
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + rows.to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=ok[:, None]
        ).to(tl.float32)  # [BLOCK_R, D]
        top_v = tl.full([BLOCK_R, KP], float("-inf"), tl.float32)
        top_i = tl.full([BLOCK_R, KP], NO_BLOCK, tl.int32)
        for b0 in range(0, last_own, BLOCK_B):  # blocks from last_own on are no row's earlier block
            blocks = b0 + tl.arange(0, BLOCK_B)
            g = tl.load(
                Gates + blocks[:, None] * stride_gb + (head // GROUP) * stride_gh + dims[None, :],
                mask=(blocks < num_blocks)[:, None],
                other=0.0,
            )  # [BLOCK_B, D]
            s = tl.dot(q, tl.trans(g), input_precision=PRECISION)  # [BLOCK_R, BLOCK_B]
            s = _gate_rule(s, blocks, position, sink, window, chunk_size)
            top_v, top_i = _insert_top(s, blocks, top_v, top_i, TOPK - 1, KP)
        top_v, top_i = _best_first(top_v, top_i, TOPK - 1, KP)
        slots = tl.arange(0, KP)
        tl.store(
            out[:, None] + slots[None, :],
            tl.where(top_v > float("-inf"), top_i, -1),
            mask=ok[:, None] & (slots[None, :] < TOPK - 1),
        )


@triton.jit
def moba_decode_gate_kernel(
    Q,  # [batch, heads, HEAD_DIM]
    Gate_cache,  # [num_pages, kv_heads, HEAD_DIM] float32: a complete block's mean key at its first page
    block_tables,  # [batch, max_pages] int32
    context_lens,  # [batch] int32, the new token included
    Chosen,  # [batch, kv_heads, num_splits] int32 bitmask out, zeroed by the caller
    stride_qb,
    stride_qh,
    stride_gp,
    stride_gh,
    stride_bt,
    num_kv_heads,
    num_splits,
    chunk_size,
    pages_per_block,
    sink,  # 1: block 0 is always chosen (moba_gating.forced_blocks)
    window,  # tokens: the blocks holding the last ``window`` up to the query are always chosen; 0 = off
    GROUP: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,  # power of two >= TOPK - 1: the running lists' width
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # power of two >= max(GROUP, 16): the group's query heads as the rows of a dot
    BLOCK_B: tl.constexpr,  # blocks scored at once
    PRECISION: tl.constexpr,  # "tf32x3" (float32 accuracy on tensor cores) on GPUs, "ieee" in the interpreter
):
    """One (sequence, KV head): the group's query heads score the complete earlier blocks a tile at a time
    (each tile's mean keys read once for the group) into running top lists, then OR each head's bit into its
    chosen blocks and the group's bits into the own block."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    position = tl.load(context_lens + b) - 1
    own = position // chunk_size
    bits = Chosen + (b * num_kv_heads + kv_head).to(tl.int64) * num_splits
    if TOPK > 1:
        heads = tl.arange(0, BLOCK_H)
        head_ok = heads < GROUP
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b.to(tl.int64) * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :],
            mask=head_ok[:, None],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_H, D]
        at = tl.full([BLOCK_H], 0, tl.int32) + position  # every row's query position
        top_v = tl.full([BLOCK_H, KP], float("-inf"), tl.float32)
        top_i = tl.full([BLOCK_H, KP], NO_BLOCK, tl.int32)
        for b0 in range(0, own, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            valid = blocks < own
            pages = tl.load(
                block_tables + b.to(tl.int64) * stride_bt + blocks * pages_per_block, mask=valid, other=0
            )
            g = tl.load(
                Gate_cache + pages.to(tl.int64)[:, None] * stride_gp + kv_head * stride_gh + dims[None, :],
                mask=valid[:, None],
                other=0.0,
            )  # [BLOCK_B, D]
            s = tl.dot(q, tl.trans(g), input_precision=PRECISION)  # [BLOCK_H, BLOCK_B]
            s = _gate_rule(s, blocks, at, sink, window, chunk_size)
            top_v, top_i = _insert_top(s, blocks, top_v, top_i, TOPK - 1, KP)
        slots = tl.arange(0, KP)[None, :]
        picked = (top_v > float("-inf")) & (slots < TOPK - 1) & head_ok[:, None]  # [BLOCK_H, KP]
        head_bits = tl.broadcast_to((1 << heads)[:, None], [BLOCK_H, KP])
        tl.atomic_or(bits + tl.where(picked, top_i, 0), head_bits, mask=picked)
    tl.atomic_or(bits + own, (1 << GROUP) - 1)


@triton.jit
def moba_close_blocks_kernel(
    Key_cache,  # [slots, kv_heads, HEAD_DIM]: the paged cache, this step's keys already written
    Gate_cache,  # [num_pages, kv_heads, HEAD_DIM] float32: a complete block's mean key at its first page
    block_tables,  # [rows, max_pages] int32
    context_lens,  # [rows] int32: each decode row's context, its new token included
    stride_kt,
    stride_kh,
    stride_gp,
    stride_gh,
    stride_bt,
    chunk_size,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (decode row, KV head): when the row's new token closed a MoBA block, store the block's mean key.
    The test runs on the device, so a captured decode step keeps the means current with no host branch."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens + row)
    if (context % chunk_size == 0) & (context > 0):
        first = context - chunk_size
        table = block_tables + row.to(tl.int64) * stride_bt
        dims = tl.arange(0, HEAD_DIM)
        total = tl.zeros([HEAD_DIM], tl.float32)
        for n0 in range(first, context, BLOCK_N):
            positions = n0 + tl.arange(0, BLOCK_N)
            ok = positions < context
            pages = tl.load(table + positions // PAGE_SIZE, mask=ok, other=0)
            slots = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
            keys = tl.load(
                Key_cache + slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=ok[:, None],
                other=0.0,
            )  # [BLOCK_N, D]
            total += tl.sum(keys.to(tl.float32), 0)
        first_page = tl.load(table + first // PAGE_SIZE).to(tl.int64)
        tl.store(Gate_cache + first_page * stride_gp + kv_head * stride_gh + dims, total / chunk_size)
