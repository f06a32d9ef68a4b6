"""Triton kernels over the paged KV cache that dense and MoBA attention share: the K/V write, split-K decode
and the log-sum-exp merge of partial results.

Importing this module needs Triton; ``paged_decode`` imports it only when it runs on a GPU. Scores are kept in
base-2 units (q·k · scale · log2 e) so the softmax uses ``exp2``; every log-sum-exp written here is base 2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    K, V, K_cache, V_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch, stride_dt, stride_dh,
    kv_heads, head_dim,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    """One token: its keys and values [kv_heads, head_dim] written to its cache slot (K and V in one launch)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    ok = (h < kv_heads) & (d < head_dim)
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(K_cache + slot * stride_ct + h * stride_ch + d, k.to(K_cache.dtype.element_ty), mask=ok)
    tl.store(V_cache + slot * stride_dt + h * stride_dh + d, v.to(V_cache.dtype.element_ty), mask=ok)


@triton.jit
def split_length(context, split_size, num_splits, MIN_SPLIT: tl.constexpr):
    """Keys per split of a ``context``-key sequence: ``split_size`` when positive (MoBA's chunks), else the
    context spread over ``num_splits`` splits of at least MIN_SPLIT keys (a multiple of it), so a graph's
    fixed grid serves every context length."""
    spread = tl.maximum((context + num_splits - 1) // num_splits, MIN_SPLIT)
    spread = (spread + MIN_SPLIT - 1) // MIN_SPLIT * MIN_SPLIT
    return tl.where(split_size > 0, split_size, spread)


@triton.jit
def lse_merge_kernel(
    O_part,  # [rows * num_slots, HEAD_DIM]
    LSE_part,  # [rows * num_slots] base 2; -inf where the slot is unused
    Out,  # [rows, HEAD_DIM] (a view of the [tokens, heads, HEAD_DIM] output)
    context_lens,  # [rows / rows_per_seq] int32 when BY_CONTEXT: slots are splits (``split_length``)
    num_rows,
    num_slots,
    rows_per_seq,
    split_size,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two (the lanes past HEAD_DIM are masked)
    BLOCK_R: tl.constexpr,
    BY_CONTEXT: tl.constexpr,  # read only the slots the block's longest context reached
    MIN_SPLIT: tl.constexpr,
):
    """Out[r] = sum_j w_j O_part[r, j] with w = softmax over j of LSE_part[r, j] (a log-sum-exp merge).

    With ``BY_CONTEXT`` the slots are splits of each sequence's context, sized for the longest context the
    engine allows (so CUDA graphs stay valid): only those a context reached are read, a data-dependent
    bound. A 256-token context among 136 splits reads one."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    if BY_CONTEXT:
        context = tl.load(context_lens + rows // rows_per_seq, mask=ok, other=0)
        length = split_length(context, split_size, num_slots, MIN_SPLIT)
        used_slots = tl.minimum(tl.max((context + length - 1) // length, 0), num_slots)
    else:
        used_slots = num_slots
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for j in range(used_slots):
        m = tl.maximum(m, tl.load(LSE_part + rows64 * num_slots + j, mask=ok, other=float("-inf")))
    m = tl.where(m > float("-inf"), m, 0.0)
    acc = tl.zeros([BLOCK_R, DIM_PAD], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for j in range(used_slots):
        lse = tl.load(LSE_part + rows64 * num_slots + j, mask=ok, other=float("-inf"))
        used = lse > float("-inf")
        w = tl.where(used, tl.exp2(lse - m), 0.0)
        part = tl.load(
            O_part + (rows64 * num_slots + j)[:, None] * HEAD_DIM + dims[None, :],
            mask=(ok & used)[:, None] & dim_ok[None, :],
            other=0.0,
        )
        acc += w[:, None] * part.to(tl.float32)
        den += w
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(
        Out + rows64[:, None] * HEAD_DIM + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=ok[:, None] & dim_ok[None, :],
    )


@triton.jit
def paged_split_decode_kernel(
    Q,  # [batch, heads, HEAD_DIM]
    K_cache,  # [slots, kv_heads, HEAD_DIM]; slot = page * PAGE + offset
    V_cache,
    block_tables,  # [batch, max_pages] int32
    context_lens,  # [batch] int32, the new token included
    chosen,  # [batch, kv_heads, num_splits] int32 bitmask: bit i = query head i of the group uses the split
    O_part,  # [batch, kv_heads, GROUP, num_splits, HEAD_DIM] fp32 (rows = batch * heads, slots = splits)
    LSE_part,  # [batch, kv_heads, GROUP, num_splits] fp32, base 2; -inf where unused
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bt,
    num_kv_heads,
    num_splits,
    split_size,
    scale_log2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two (MLA's 192: 256, the rest masked)
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DENSE: tl.constexpr,  # every head uses every split: ``chosen`` is not read
    MIN_SPLIT: tl.constexpr,
):
    """One (sequence, KV head, split of ``split_length`` keys): the group's query heads that use the split
    attend to it, reading its keys once from the paged cache."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    kv_head = bh % num_kv_heads
    part = (bh * num_splits + split).to(tl.int64)
    heads = tl.arange(0, GROUP_PAD)
    slot = (bh * GROUP + heads).to(tl.int64) * num_splits + split  # [GROUP_PAD] row-major (head row, split)
    head_ok = heads < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    if DENSE:
        bits = (1 << GROUP) - 1
    else:
        bits = tl.load(chosen + part)
    context = tl.load(context_lens + b)
    length = split_length(context, split_size, num_splits, MIN_SPLIT)
    kv_start = split * length
    used = ((bits >> heads) & 1) == 1
    if (bits == 0) | (kv_start >= context):
        tl.store(LSE_part + slot, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=head_ok)
        return
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [GROUP_PAD, DIM_PAD]
    kv_stop = tl.minimum(kv_start + length, context)
    table = block_tables + b.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n0 in range(kv_start, kv_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_stop
        page = tl.load(table + cols // PAGE, mask=col_ok, other=0)
        slots = (page.to(tl.int64) * PAGE + cols % PAGE)[:, None]
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K_cache + slots * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_ok, other=0.0)
        s = (
            tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        )  # [GROUP_PAD, BLOCK_N]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_cache + slots * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    lse = tl.where(used, m_i + tl.log2(l_i), float("-inf"))
    tl.store(
        O_part + slot[:, None] * HEAD_DIM + dims[None, :],
        out,
        mask=(head_ok & used)[:, None] & dim_ok[None, :],
    )
    tl.store(LSE_part + slot, lse, mask=head_ok)


@triton.jit
def paged_prefill_kernel(
    Q,  # [tokens, heads, HEAD_DIM]: the step's prompt-chunk rows
    K_cache,  # [slots, kv_heads, HEAD_DIM]; the chunk's own keys are already written
    V_cache,
    Out,  # [tokens, heads, HEAD_DIM]
    block_tables,  # [seqs, max_pages] int32
    query_starts,  # [seqs + 1] int32: sequence s owns rows query_starts[s] .. query_starts[s + 1]
    context_lens,  # [seqs] int32: cached prefix + chunk
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    scale_log2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (sequence, tile, KV head): the tile's BLOCK_Q queries of the sequence's chunk, for the GROUP
    query heads of the KV head (rows are (query, head) pairs), attend the cached prefix and the chunk itself
    causally, read through the block table. The chunk's queries sit at the last positions of the context, so
    query i of the chunk sees keys 0 .. context - chunk + i. Tiles past a shorter chunk's end exit at once
    (the grid is sized for the longest chunk)."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    seq = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_starts + seq)
    chunk = tl.load(query_starts + seq + 1) - q_begin
    if first >= chunk:
        return
    context = tl.load(context_lens + seq)
    rows = tl.arange(0, BLOCK_M)
    query = first + rows // GROUP_PAD  # [M] within the chunk
    head = rows % GROUP_PAD
    row_ok = (query < chunk) & (head < GROUP)
    position = context - chunk + query  # [M]: each query's own position, the last key it sees
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q
        + (q_begin + query).to(tl.int64)[:, None] * stride_qt
        + (kv_head * GROUP + head)[:, None] * stride_qh
        + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [M, DIM_PAD]
    kv_stop = tl.minimum(context - chunk + first + BLOCK_Q, context)  # past the tile's last query
    # Keys before the tile's first query's position + 1 are seen by every row: those whole key blocks need no
    # causal mask and no bounds checks, the usual case of a long cached prefix. The rest is masked.
    unmasked_stop = (context - chunk + first + 1) // BLOCK_N * BLOCK_N
    table = block_tables + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    k_rows, v_rows = (
        K_cache + kv_head * stride_kh + dims[None, :],
        V_cache + kv_head * stride_vh + dims[None, :],
    )
    for n0 in range(0, unmasked_stop, BLOCK_N):
        m_i, l_i, acc = _prefill_key_block(
            q, m_i, l_i, acc, n0, kv_stop, position, table, k_rows, v_rows, stride_kt, stride_vt, dim_ok,
            scale_log2, BLOCK_N, PAGE, DOT_PRECISION, MASKED=False,
        )  # fmt: skip
    for n0 in range(unmasked_stop, kv_stop, BLOCK_N):
        m_i, l_i, acc = _prefill_key_block(
            q, m_i, l_i, acc, n0, kv_stop, position, table, k_rows, v_rows, stride_kt, stride_vt, dim_ok,
            scale_log2, BLOCK_N, PAGE, DOT_PRECISION, MASKED=True,
        )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(
        Out
        + (q_begin + query).to(tl.int64)[:, None] * stride_ot
        + (kv_head * GROUP + head)[:, None] * stride_oh
        + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


@triton.jit
def _prefill_key_block(
    q,  # [M, DIM_PAD]
    m_i,  # [M] running max (log2 units)
    l_i,  # [M] running sum
    acc,  # [M, DIM_PAD] running output
    n0,  # first key of the block
    kv_stop,  # keys at or past this are outside the tile's reach
    position,  # [M] each row's own position: the last key it sees
    table,  # the sequence's block-table row
    k_rows,  # K_cache offset to the KV head, [1, DIM_PAD] pointers
    v_rows,
    stride_kt,
    stride_vt,
    dim_ok,  # [DIM_PAD]
    scale_log2,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the block is seen by every row (no causal or bounds mask)
):
    """One online-softmax step of ``paged_prefill_kernel`` over keys n0 .. n0 + BLOCK_N."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_stop
    if MASKED:
        page = tl.load(table + cols // PAGE, mask=col_ok, other=0)
        kv_ok = col_ok[:, None] & dim_ok[None, :]
    else:
        page = tl.load(table + cols // PAGE)
        kv_ok = dim_ok[None, :]
    slots = (page.to(tl.int64) * PAGE + cols % PAGE)[:, None]
    k = tl.load(k_rows + slots * stride_kt, mask=kv_ok, other=0.0)
    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
    if MASKED:
        s = tl.where(col_ok[None, :] & (cols[None, :] <= position[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # every row sees key 0 in the first block: finite from there
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_rows + slots * stride_vt, mask=kv_ok, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc
