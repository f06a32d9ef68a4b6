"""The LoRA update's second half on CUDA in one launch per projection: y += (t kept to each row's slot) @ B.

``t = x @ A^T`` holds every slot's ranks for every row (one cuBLAS matmul before this); each row keeps the
ranks of its own slot (none for a base-model row) and adds their product with B, the projection's shards'
B as one block-diagonal matrix (lora/slots.py). One kernel replaces a mask multiply and a matmul: inside a
decode graph a launch costs about as much as the work of either.

Importing this module needs Triton; ``LoRALinear`` imports it only on a GPU (the interpreter runs it on the
CPU in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lora_expand_kernel(
    T, slots, B, Y,
    rows, out_features, width,
    stride_t, stride_b, stride_y,
    NUM_SLOTS: tl.constexpr, RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_M rows, BLOCK_N outputs] tile of Y += (T masked to each row's slot) @ B. T's columns run
    (shard, slot, rank), so column k belongs to slot (k // RANK) % NUM_SLOTS."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots + m, mask=m < rows, other=-1)  # [BLOCK_M]; -1: the base model, nothing kept
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        keep = ((k[None, :] // RANK) % NUM_SLOTS == slot[:, None]) & (k[None, :] < width)
        t = tl.load(T + m[:, None] * stride_t + k[None, :], mask=keep, other=0.0)  # [BLOCK_M, BLOCK_K]
        b_ok = (k[:, None] < width) & (n[None, :] < out_features)
        b = tl.load(B + k[:, None] * stride_b + n[None, :], mask=b_ok, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(t, b, acc, input_precision=DOT_PRECISION)
    ok = (m[:, None] < rows) & (n[None, :] < out_features)
    at = Y + m[:, None] * stride_y + n[None, :]
    y = tl.load(at, mask=ok)
    tl.store(at, (y.to(tl.float32) + acc).to(Y.dtype.element_ty), mask=ok)


def lora_expand(
    y: torch.Tensor,  # [rows, out] the base projection's output, updated in place
    t: torch.Tensor,  # [rows, shards * slots * rank] every slot's ranks
    slots: torch.Tensor,  # [>= rows] int32: each row's slot, -1 for none
    b: torch.Tensor,  # [shards * slots * rank, out] block-diagonal B
    num_slots: int,
    rank: int,
) -> torch.Tensor:
    """y += each row's own slot's share of t, times B; returns y."""
    rows, out_features = y.shape
    if rows == 0:
        return y
    block_m = 16 if rows <= 16 else 64  # tl.dot takes at least 16 rows; decode graphs are mostly small
    block_n = 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    lora_expand_kernel[grid](
        t, slots, b, y, rows, out_features, t.shape[1], t.stride(0), b.stride(0), y.stride(0),
        NUM_SLOTS=num_slots, RANK=rank, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32,
        DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return y
