"""Fused-MoE Triton path for stacked SwiGLU experts: every (token, slot) pair's expert output, then the
weighted sum over slots, in four launches (``moe_triton_kernels``): align, gate/up, down and combine.

Importing this module needs Triton; ``layers/moe.py`` imports it only when the Triton path runs. ``align``
sorts the pairs into one-expert row-blocks on the device (no host sync, so the path is CUDA-graph safe);
``fused_experts`` runs gate/up + silu and down over those blocks and writes each row to its (token, slot)
position; ``combine`` sums the slots with their weights in a fixed order (no atomics), so results are
deterministic. Shared experts may ride along as extra slots every token uses (their weights appended to the
stacked experts), or be passed to ``combine`` already computed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from longserve.layers import moe_triton_kernels as kernels

ALIGN_BLOCK = 1024  # pairs per align program (and per step of the one-program align)
ONE_PROGRAM_MAX_PAIRS = 8192  # up to here one program aligns every pair: one launch, no zeroed scratch


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one matmul kernel (both kernels share block_m: the alignment)."""

    block_m: int  # rows (pairs) per block: every block belongs to one expert
    block_n: int
    block_k: int
    group_m: int  # row-blocks that walk the N-tiles together (L2 reuse of the weight tiles)
    num_warps: int
    num_stages: int


def default_configs(tokens: int, pairs: int, experts: int) -> tuple[TileConfig, TileConfig]:
    """(gate/up tiles, down tiles) by rows per expert: few (decode) -> BLOCK_M 16, the run is weight-read bound
    and wants many N-tiles in flight; many (prefill) -> 128, the run is matmul bound and wants big tiles.
    Picked by sweeps on an H200 (benchmarks/NOTES.md); the down kernel has one accumulator, so wider tiles."""
    rows_per_expert = pairs / max(experts, 1)
    if tokens <= 32 or rows_per_expert <= 16:
        tiles = TileConfig(16, 64, 128, 1, 4, 4)
        return tiles, tiles
    if tokens <= 512 or rows_per_expert <= 96:
        return TileConfig(32, 64, 128, 1, 4, 3), TileConfig(32, 128, 128, 1, 4, 3)
    # Prefill sizes: at 1024 tokens these take 0.485 ms against 0.551 for 64-row tiles.
    return TileConfig(128, 128, 64, 16, 8, 4), TileConfig(128, 256, 64, 8, 8, 3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_tma(x: torch.Tensor, hidden: int, inter: int) -> bool:
    """Bulk tensor copies of the weight tiles on Hopper and newer (not under the interpreter); their row
    strides must be multiples of 16 bytes."""
    aligned = (hidden * x.element_size()) % 16 == 0 and (inter * x.element_size()) % 16 == 0
    return aligned and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


@dataclass(frozen=True)
class Alignment:
    """Where every pair sits in the expert-sorted, padded row order (see ``align``)."""

    sorted_pairs: torch.Tensor  # [max_padded] int32: the pair of each row, or num_pairs for a padding row
    block_expert: torch.Tensor  # [max_padded // block_m] int32: the expert of each row-block
    num_padded: torch.Tensor  # [1] int32: rows up to the end of the last run; blocks past it exit at once
    num_pairs: int
    slots: int  # K: routed top_k + shared slices


def align(
    ids: torch.Tensor,  # [tokens, top_k], values in [0, experts - shared_slices)
    experts: int,  # stacked experts, shared slices included
    block_m: int,
    shared_slices: int = 0,
) -> Alignment:
    """Pairs grouped by expert, each expert's run padded to a multiple of block_m, without a host sync: one
    launch for up to ONE_PROGRAM_MAX_PAIRS pairs, else a count and a placement launch over many programs.

    The row bound max_padded is static (every expert with rows pads fewer than block_m of them), so the
    matmul grids are known on the host.
    """
    tokens, top_k = ids.shape
    ids = ids.contiguous()
    slots = top_k + shared_slices
    routed_pairs, num_pairs = tokens * top_k, tokens * slots
    num_bins = triton.next_power_of_2(experts)
    max_padded = triton.cdiv(num_pairs + min(experts, num_pairs) * (block_m - 1), block_m) * block_m
    max_blocks = max_padded // block_m
    one_program = num_pairs <= ONE_PROGRAM_MAX_PAIRS
    scratch = (torch.empty if one_program else torch.zeros)(
        2 * num_bins, device=ids.device, dtype=torch.int32
    )
    out = torch.empty(max_padded + max_blocks + 1, device=ids.device, dtype=torch.int32)
    sorted_pairs, block_expert, num_padded = out.split((max_padded, max_blocks, 1))
    counts, cursor = scratch.split(num_bins)
    if not one_program and routed_pairs:
        grid = (triton.cdiv(routed_pairs, ALIGN_BLOCK),)
        kernels.count_kernel[grid](ids, counts, routed_pairs, BLOCK=ALIGN_BLOCK, NUM_BINS=num_bins)
    kernels.align_kernel[(1 if one_program else triton.cdiv(num_pairs, ALIGN_BLOCK),)](
        ids, counts, cursor, sorted_pairs, block_expert, num_padded,
        tokens, top_k, slots, experts, max_blocks,
        BLOCK=ALIGN_BLOCK, BLOCK_M=block_m, NUM_BINS=num_bins, BLOCKS_PER_STEP=max(1, 2048 // block_m),
        ONE_PROGRAM=one_program,
    )  # fmt: skip
    return Alignment(sorted_pairs, block_expert, num_padded, num_pairs, slots)


def fused_experts(
    x: torch.Tensor,  # [tokens, hidden]
    ids: torch.Tensor,  # [tokens, top_k] routed ids, values in [0, experts - shared_slices)
    w_gate_up: torch.Tensor,  # [experts, 2 inter, hidden]; the last shared_slices are the shared slices
    w_down: torch.Tensor,  # [experts, hidden, inter]
    config: TileConfig | None = None,  # None: default_configs'
    shared_slices: int = 0,
    use_tma: bool | None = None,  # None: on Hopper and newer
    down_config: TileConfig | None = None,  # the down kernel's tiles (same block_m); None: config's
) -> torch.Tensor:
    """expert outputs for every (token, slot): [tokens, top_k + shared_slices, hidden], x's dtype, unweighted."""
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError("the Triton MoE path needs a CUDA device (or TRITON_INTERPRET=1)")
    tokens, top_k = ids.shape
    experts, two_inter, hidden = w_gate_up.shape
    inter = two_inter // 2
    slots = top_k + shared_slices
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    out = x.new_empty(tokens, slots, hidden)
    if tokens == 0 or slots == 0:
        return out
    if config is None:
        cfg, down = default_configs(tokens, tokens * slots, experts)
    else:
        cfg, down = config, down_config or config
    if down.block_m != cfg.block_m:
        raise ValueError("both kernels share the aligned row-blocks: down_config.block_m must equal block_m")
    if x.element_size() == 4:  # float32 tiles take twice the shared memory per stage
        cfg = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 2))
        down = dataclasses.replace(down, num_stages=min(down.num_stages, 2))
    tma = _use_tma(x, hidden, inter) if use_tma is None else use_tma
    rows = align(ids, experts, cfg.block_m, shared_slices)
    max_padded = rows.sorted_pairs.numel()
    act = x.new_empty(max_padded, inter)  # [max_padded, inter]; padding rows are never written
    blocks = max_padded // cfg.block_m
    common = dict(
        BLOCK_M=cfg.block_m,
        USE_TMA=tma,
        # float32 (exact mode, tests): IEEE products; bf16/fp16 ignore the precision.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    wgu_desc = a_desc = wd_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        wgu_desc = TensorDescriptor.from_tensor(w_gate_up.view(-1, hidden), [cfg.block_n, cfg.block_k])
        wd_desc = TensorDescriptor.from_tensor(w_down.view(-1, inter), [down.block_n, down.block_k])
        a_desc = TensorDescriptor.from_tensor(act, [down.block_m, down.block_k])
    index = (rows.sorted_pairs, rows.block_expert, rows.num_padded, rows.num_pairs)
    kernels.gate_up_silu_kernel[(blocks * triton.cdiv(inter, cfg.block_n),)](
        x, w_gate_up, wgu_desc, act, *index, slots, INTER=inter, HIDDEN=hidden, **common, **_tiles(cfg)
    )  # fmt: skip
    kernels.down_kernel[(blocks * triton.cdiv(hidden, down.block_n),)](
        act, a_desc, w_down, wd_desc, out, *index, HIDDEN=hidden, INTER=inter, **common, **_tiles(down)
    )  # fmt: skip
    return out


def _tiles(cfg: TileConfig) -> dict:
    return dict(
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def combine(
    ys: torch.Tensor,  # [tokens, slots, hidden] from fused_experts
    weights: torch.Tensor,  # [tokens, top_k] routing weights (slots past top_k are shared slices)
    shared_gate_logit: torch.Tensor | None = None,  # [tokens, 1]: shared part scaled by its sigmoid
    shared: torch.Tensor | None = None,  # [tokens, hidden]: a shared-expert output computed elsewhere
) -> torch.Tensor:
    """sum_j<top_k w_j ys_j + g * (sum of the shared slots + shared): [tokens, hidden] in ys's dtype."""
    tokens, slots, hidden = ys.shape
    out = ys.new_empty(tokens, hidden)
    if tokens == 0:
        return out
    weights = weights.float().contiguous()
    gate = shared_gate_logit.reshape(tokens).contiguous() if shared_gate_logit is not None else None
    shared = shared.contiguous() if shared is not None else None
    block_h = min(1024, triton.next_power_of_2(hidden))
    kernels.combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        ys.contiguous(), weights, gate, shared, out, weights.shape[1], slots,
        HIDDEN=hidden, BLOCK_H=block_h, HAS_GATE=gate is not None, HAS_SHARED=shared is not None, num_warps=4,
    )  # fmt: skip
    return out
