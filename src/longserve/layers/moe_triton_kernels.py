"""Triton kernels of the fused-MoE path (``moe_triton`` launches them): align the (token, k) pairs to one-expert
row-blocks, the two expert matmuls, and the weighted sum over k.

Pairs are numbered p = t * K + j (token t, slot j, K = top_k + shared slices). Slot j < top_k is the token's
j-th routed expert; slot top_k + s is shared slice s, which every token uses (expert index num_routed + s of
the stacked weights). Align places each pair in a row of its expert's run, every run padded to a multiple of
BLOCK_M, so every BLOCK_M row-block belongs to one expert. Within a run the rows' order comes from atomics and
may change between calls; the values cannot, because each row of a matrix product depends only on its own
inputs, and every row is written back to its pair's own slot.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def count_kernel(
    Ids,  # [tokens, top_k] routed expert ids, contiguous
    Counts,  # [NUM_BINS] int32, zeroed: rows per expert (routed pairs only)
    routed_pairs,
    BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Counts[e] += routed pairs of this program's BLOCK that chose expert e (the many-pairs path)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < routed_pairs
    expert = tl.load(Ids + p, mask=ok, other=0).to(tl.int32)
    tl.atomic_add(Counts + tl.arange(0, NUM_BINS), tl.histogram(expert, NUM_BINS, mask=ok))


@triton.jit
def _slot_experts(Ids, p, ok, top_k, slots, routed):
    """The expert of each pair p = t * slots + j: the routed id for j < top_k, else shared slice j - top_k."""
    token, slot = p // slots, p % slots
    is_routed = slot < top_k
    expert = tl.load(Ids + token * top_k + slot, mask=ok & is_routed, other=0).to(tl.int32)
    return tl.where(is_routed, expert, routed + slot - top_k), token, is_routed


@triton.jit
def align_kernel(
    Ids,  # [tokens, top_k] routed expert ids, contiguous
    Counts,  # [NUM_BINS] int32 from count_kernel (unused with ONE_PROGRAM)
    Cursor,  # [NUM_BINS] int32 scratch: rows handed out per routed expert so far (zeroed, or zeroed here)
    SortedPairs,  # [max_padded] int32 out: the pair of each row, or num_pairs for a padding row
    BlockExpert,  # [max_padded // BLOCK_M] int32 out: the expert of each row-block
    NumPadded,  # [1] int32 out: rows up to the end of the last run
    tokens,
    top_k,
    slots,  # K = top_k + shared slices
    num_experts,  # routed experts + shared slices
    max_blocks,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
    ONE_PROGRAM: tl.constexpr,  # count here too and place every pair (one launch for few pairs)
):
    """Places pairs in their expert's run: every program its BLOCK of pairs, or with ONE_PROGRAM all of them
    after counting them; program 0 also writes the row-blocks' experts and the padding rows."""
    routed = num_experts - (slots - top_k)
    num_pairs = tokens * slots
    bins = tl.arange(0, NUM_BINS)
    if ONE_PROGRAM:
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        for p0 in range(0, tokens * top_k, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            ok = p < tokens * top_k
            counts += tl.histogram(tl.load(Ids + p, mask=ok, other=0).to(tl.int32), NUM_BINS, mask=ok)
        tl.store(Cursor + bins, tl.zeros([NUM_BINS], dtype=tl.int32))
        tl.debug_barrier()  # the zeroed cursors are visible to every thread before the atomics below
    else:
        counts = tl.load(Counts + bins)
    counts = tl.where((bins >= routed) & (bins < num_experts), tokens, counts)  # shared slices: every token
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded

    first = 0 if ONE_PROGRAM else tl.program_id(0) * BLOCK
    last = num_pairs if ONE_PROGRAM else first + BLOCK
    for p0 in range(first, last, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        ok = p < num_pairs
        expert, token, is_routed = _slot_experts(Ids, p, ok, top_k, slots, routed)
        rank = tl.atomic_add(Cursor + expert, 1, mask=ok & is_routed)
        rank = tl.where(is_routed, rank, token)  # a shared slice's run is the tokens in order
        tl.store(SortedPairs + tl.gather(starts, expert, 0) + rank, p.to(tl.int32), mask=ok)

    if tl.program_id(0) == 0:
        total = tl.sum(padded, 0)
        tl.store(NumPadded, total)
        run_ends = (starts + counts)[None, :]  # [1, NUM_BINS]: where each run's real rows end
        for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
            blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
            first_row = blocks * BLOCK_M
            # The block's expert: how many runs end at or before its first row (empty runs end where they start).
            owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), 1)
            owner = tl.minimum(owner, num_experts - 1)
            tl.store(BlockExpert + blocks, owner, mask=blocks < max_blocks)
            owner_end = tl.sum(tl.where(bins[None, :] == owner[:, None], run_ends, 0), 1)  # [BLOCKS_PER_STEP]
            rows = first_row[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [BLOCKS_PER_STEP, BLOCK_M]
            padding = (first_row < total)[:, None] & (rows >= owner_end[:, None])
            tl.store(SortedPairs + rows, tl.full(rows.shape, num_pairs, tl.int32), mask=padding)


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-blocks sweep the N-tiles together, so a weight tile is reused from L2."""
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def gate_up_silu_kernel(
    X,  # [tokens, HIDDEN] contiguous
    W,  # [experts, 2 INTER, HIDDEN] contiguous: rows [0, INTER) gate, [INTER, 2 INTER) up
    W_desc,  # TensorDescriptor over W viewed as [experts * 2 INTER, HIDDEN], block [BLOCK_N, BLOCK_K] (USE_TMA)
    Act,  # [max_padded, INTER] out: silu(x W_gate^T) * (x W_up^T) per row
    SortedPairs,  # [max_padded] int32
    BlockExpert,  # [max_padded // BLOCK_M] int32
    NumPadded,  # [1] int32
    num_pairs,
    slots,
    INTER: tl.constexpr,
    HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One row-block (one expert) x one BLOCK_N slice of INTER: gate and up tiles for the same columns."""
    num_pid_n = tl.cdiv(INTER, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    expert = tl.load(BlockExpert + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedPairs + rows)
    row_ok = pair < num_pairs  # padding rows read zeros and are never read back
    token = (pair // slots).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + token[:, None] * HIDDEN + ks[None, :]  # [BLOCK_M, BLOCK_K]
    gate_row = expert * 2 * INTER + pid_n * BLOCK_N  # first row of the gate tile in the [E * 2 I, H] view
    wg_ptrs = W + gate_row.to(tl.int64) * HIDDEN + tl.arange(0, BLOCK_N)[None, :] * HIDDEN + ks[:, None]
    wu_ptrs = wg_ptrs + INTER * HIDDEN
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(HIDDEN, BLOCK_K)):
        k_ok = ks < HIDDEN - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_TMA:  # columns past INTER belong to the next slice: computed, never stored
            wg = tl.trans(W_desc.load([gate_row, k0 * BLOCK_K]))  # [BLOCK_K, BLOCK_N]
            wu = tl.trans(W_desc.load([gate_row + INTER, k0 * BLOCK_K]))
        else:
            wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up in float32, rounded once
    a_ptrs = Act + rows[:, None].to(tl.int64) * INTER + cols[None, :]
    tl.store(a_ptrs, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    Act,  # [max_padded, INTER] contiguous
    A_desc,  # TensorDescriptor over Act, block [BLOCK_M, BLOCK_K] (USE_TMA)
    W,  # [experts, HIDDEN, INTER] contiguous
    W_desc,  # TensorDescriptor over W viewed as [experts * HIDDEN, INTER], block [BLOCK_N, BLOCK_K] (USE_TMA)
    Out,  # [pairs, HIDDEN]: row t * K + j is token t's slot-j output
    SortedPairs,
    BlockExpert,
    NumPadded,
    num_pairs,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One row-block x one BLOCK_N slice of HIDDEN: act @ w_down[e]^T, each real row stored at its pair."""
    num_pid_n = tl.cdiv(HIDDEN, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    expert = tl.load(BlockExpert + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedPairs + rows)
    row_ok = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = Act + rows[:, None].to(tl.int64) * INTER + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_row = expert * HIDDEN + pid_n * BLOCK_N
    w_ptrs = W + w_row.to(tl.int64) * INTER + tl.arange(0, BLOCK_N)[None, :] * INTER + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(INTER, BLOCK_K)):
        if USE_TMA:  # keys past INTER read as zeros in both operands; padding rows are garbage, never stored
            a = A_desc.load([pid_m * BLOCK_M, k0 * BLOCK_K])
            w = tl.trans(W_desc.load([w_row, k0 * BLOCK_K]))  # [BLOCK_K, BLOCK_N]
        else:
            k_ok = ks < INTER - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    o_ptrs = Out + pair[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_kernel(
    Ys,  # [tokens, slots, HIDDEN] contiguous: every slot's expert output
    Weights,  # [tokens, top_k] float32 contiguous routing weights
    GateLogit,  # [tokens] shared-expert gate logits (HAS_GATE)
    Shared,  # [tokens, HIDDEN] contiguous: a dense shared-expert output to add (HAS_SHARED)
    Out,  # [tokens, HIDDEN]
    top_k,
    slots,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    """out = sum_j<top_k w_j y_j + g (sum_j>=top_k y_j + shared), g = sigmoid(gate logit) or 1: float32, in
    slot order (no atomics), rounded once."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < HIDDEN
    y_row = Ys + token * slots * HIDDEN + cols
    routed = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(0, top_k):
        w = tl.load(Weights + token * top_k + j)
        routed += w * tl.load(y_row + j * HIDDEN, mask=ok, other=0.0).to(tl.float32)
    shared = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(top_k, slots):
        shared += tl.load(y_row + j * HIDDEN, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHARED:
        shared += tl.load(Shared + token * HIDDEN + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        shared *= tl.sigmoid(tl.load(GateLogit + token).to(tl.float32))
    tl.store(Out + token * HIDDEN + cols, (routed + shared).to(Out.dtype.element_ty), mask=ok)
