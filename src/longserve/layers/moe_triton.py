"""Fused-MoE Triton path for stacked SwiGLU experts: the (token, k) pairs' expert outputs in two kernels.

Importing this module needs Triton; ``layers/moe.py`` imports it only when the Triton path runs. The pairs are
sorted by expert and each expert's run padded to a multiple of BLOCK_M (``align``, torch ops, no host sync),
so every BLOCK_M row-block belongs to one expert. Kernel 1 gathers each block's token rows of x and applies
the expert's gate and up projections and silu(gate) * up in one program; kernel 2 applies the down projection
and writes each real row straight to its (token, k) position. No atomics: the caller sums over k in fixed
order, so results are deterministic.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters shared by both kernels."""

    block_m: int  # rows (pairs) per block: every block belongs to one expert
    block_n: int
    block_k: int
    group_m: int  # row-blocks that walk the N-tiles together (L2 reuse of the weight tiles)
    num_warps: int
    num_stages: int


def default_config(tokens: int, pairs: int, experts: int) -> TileConfig:
    """A heuristic by rows per expert: few (decode) -> BLOCK_M 16, the run is weight-read bound and wants many
    N-tiles in flight; many (prefill) -> 64/128, the run is matmul bound and wants big tiles."""
    rows_per_expert = pairs / max(experts, 1)
    if tokens <= 32 or rows_per_expert <= 16:
        return TileConfig(16, 64, 128, 1, 4, 4)
    if tokens <= 512 or rows_per_expert <= 96:
        return TileConfig(32, 64, 128, 4, 4, 4)
    if tokens <= 2048:
        return TileConfig(64, 128, 64, 8, 4, 3)
    return TileConfig(128, 128, 64, 8, 8, 3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def align(
    ids: torch.Tensor,  # [tokens, k], values in [0, experts)
    experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of block_m, without a host sync.

    Returns ``sorted_pair_ids`` ([max_padded] int32: pair index t * k + j, or the sentinel ``pairs`` for
    padding), ``block_expert`` ([max_padded // block_m] int32: the expert of each row-block) and
    ``num_padded`` ([1] int32: the real padded length; blocks at or past it exit at once). max_padded is a
    static bound, so the grid is known on the host.
    """
    pairs = ids.numel()
    device = ids.device
    flat_ids = ids.reshape(-1).to(torch.int32)  # [pairs], pair p = (token p // k, choice p % k)
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # [pairs]: pairs grouped by expert
    # [experts + 1]: where each expert's run starts (and the last one ends); searchsorted needs no host sync
    bounds = torch.searchsorted(
        sorted_ids, torch.arange(experts + 1, device=device, dtype=torch.int32), out_int32=True
    )
    starts, counts = bounds[:-1], bounds.diff()  # [experts] each
    padded_counts = (counts + (block_m - 1)) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0, dtype=torch.int32)  # [experts]
    # Sorted pair i lands at i + its expert's (padded start - start): few tiny ops, then one gather.
    shift = (padded_ends - padded_counts - starts).long()  # [experts]
    dest = torch.arange(pairs, device=device) + shift[sorted_ids]  # [pairs]
    # At most min(experts, pairs) experts get rows, each padding fewer than block_m rows.
    max_padded = (pairs + min(experts, pairs) * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_pair_ids = torch.full((max_padded,), pairs, device=device, dtype=torch.int32)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=device, dtype=torch.int32)
    # First expert whose padded run ends after the block's start; blocks past the end clamp (and exit early).
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True, out_int32=True)
    block_expert = block_expert.clamp_(max=experts - 1)
    return sorted_pair_ids, block_expert, padded_ends[-1:]


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
    X,  # [tokens, hidden]
    W,  # [experts, 2 inter, hidden]: rows [0, inter) gate, [inter, 2 inter) up
    Act,  # [max_padded, inter] out: silu(x W_gate^T) * (x W_up^T) per sorted, padded pair
    sorted_pair_ids,  # [max_padded] int32
    block_expert,  # [max_padded // BLOCK_M] int32
    num_padded,  # [1] int32
    num_pairs,
    top_k,
    inter,
    hidden,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_at,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One row-block (one expert) x one BLOCK_N slice of inter: gate and up tiles for the same columns."""
    num_pid_m = tl.cdiv(tl.num_programs(0), tl.cdiv(inter, BLOCK_N))
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded):
        return
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids + rows)
    row_ok = pair < num_pairs  # padding rows read zeros and are never read back
    token = (pair // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + token[:, None] * stride_xt + ks[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_base = W + expert * stride_we
    wg_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    wu_ptrs = wg_ptrs + inter * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = ks < hidden - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up in float32, rounded once
    a_ptrs = Act + rows[:, None].to(tl.int64) * stride_at + cols[None, :] * stride_an
    tl.store(a_ptrs, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    Act,  # [max_padded, inter]
    W,  # [experts, hidden, inter]
    Out,  # [pairs, hidden]: row t * k + j is token t's j-th expert output
    sorted_pair_ids,
    block_expert,
    num_padded,
    num_pairs,
    hidden,
    inter,
    stride_at,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One row-block x one BLOCK_N slice of hidden: act @ w_down[e]^T, each real row stored at its pair."""
    num_pid_m = tl.cdiv(tl.num_programs(0), tl.cdiv(hidden, BLOCK_N))
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded):
        return
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids + rows)
    row_ok = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = Act + rows[:, None].to(tl.int64) * stride_at + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = ks < inter - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    o_ptrs = Out + pair[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_on
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    ids: torch.Tensor,  # [tokens, k], values in [0, w_gate_up.shape[0])
    w_gate_up: torch.Tensor,  # [experts, 2 inter, hidden]
    w_down: torch.Tensor,  # [experts, hidden, inter]
    config: TileConfig | None = None,
) -> torch.Tensor:
    """expert_{ids[t, j]}(x[t]) for every pair: [tokens, k, hidden], in x's dtype, unweighted."""
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError("the Triton MoE path needs a CUDA device (or TRITON_INTERPRET=1)")
    tokens, top_k = ids.shape
    experts, two_inter, hidden = w_gate_up.shape
    inter = two_inter // 2
    pairs = tokens * top_k
    out = x.new_empty(tokens, top_k, hidden)
    if pairs == 0:
        return out
    cfg = config or default_config(tokens, pairs, experts)
    if x.element_size() == 4:  # float32 tiles take twice the shared memory per stage
        cfg = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 2))
    sorted_pair_ids, block_expert, num_padded = align(ids, experts, cfg.block_m)
    max_padded = sorted_pair_ids.numel()
    act = x.new_empty(max_padded, inter)  # [max_padded, inter]; padding rows are never written or read
    blocks = max_padded // cfg.block_m
    # float32 (exact mode, tests): IEEE products; bf16/fp16 ignore the precision.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tiles = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_PRECISION=precision,
    )
    gate_up_silu_kernel[(blocks * triton.cdiv(inter, cfg.block_n),)](
        x,
        w_gate_up,
        act,
        sorted_pair_ids,
        block_expert,
        num_padded,
        pairs,
        top_k,
        inter,
        hidden,
        *x.stride(),
        *w_gate_up.stride(),
        *act.stride(),
        **tiles,
        **launch,
    )
    flat = out.view(pairs, hidden)  # [pairs, hidden], row t * k + j
    down_kernel[(blocks * triton.cdiv(hidden, cfg.block_n),)](
        act,
        w_down,
        flat,
        sorted_pair_ids,
        block_expert,
        num_padded,
        pairs,
        hidden,
        inter,
        *act.stride(),
        *w_down.stride(),
        *flat.stride(),
        **tiles,
        **launch,
    )
    return out
