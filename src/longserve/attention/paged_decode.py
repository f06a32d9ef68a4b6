"""Paged decode on CUDA, shared by dense and MoBA attention: each new token attends its context straight from
the paged KV cache (split-K over the context, then a log-sum-exp merge); MoBA passes the splits its gating
chose, dense reads them all. The kernels are in ``paged_triton``.
"""

from __future__ import annotations

import torch

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache

_LOG2E = 1.4426950408889634
MIN_SPLIT = 64  # keys: a split shorter than this costs more to launch and merge than it saves
PROGRAMS_PER_SM = 4  # dense decode splits until (sequences x KV heads x splits) fills the GPU this often
MAX_HEAD_DIM = 256  # the dense decode kernel pads any head size up to this to a power of two


def decode_kernel_takes(head_dim: int) -> bool:
    """Whether the dense paged decode kernel (and so a captured decode step) takes this head size."""
    return 0 < head_dim <= MAX_HEAD_DIM


def cuda_path_available(q: torch.Tensor, *, any_head_dim: bool = False) -> bool:
    """Triton kernels run for CUDA tensors whose head size is a power of two from 16 to 256 (MoBA's kernels);
    ``any_head_dim``: any size the dense decode kernel takes (``decode_kernel_takes``)."""
    dim = q.shape[-1]
    fits = decode_kernel_takes(dim) if any_head_dim else dim in (16, 32, 64, 128, 256)
    if not q.is_cuda or not fits:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_layout(metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block tables [batch, pages] and context lengths [batch] (int32, built once per step), and the longest."""
    return metadata.decode_block_tables, metadata.decode_seq_lens, metadata.max_decode_len


def cuda_dense_decode(
    q: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Full attention of every decode over its paged context. Each (sequence, KV head) gets the same number of
    splits, enough programs to fill the GPU at this batch size, and every context is spread over them in the
    kernel: the grid depends on the batch only, so one CUDA graph per batch bucket serves any context."""
    tables, context_lens, longest = paged_layout(metadata)
    batch, kv_heads = q.shape[0], cache.key.shape[1]
    sized_for = metadata.split_context or longest
    splits = dense_splits(batch * kv_heads, sized_for, q.device)
    return paged_decode(
        q if q.stride(-1) == 1 else q.contiguous(),
        cache.key,
        cache.value,
        tables,
        context_lens,
        longest,
        metadata.block_size,
        0,
        scale,
        num_splits=splits,
    )


def dense_splits(programs_per_split: int, sized_for: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough for the grid to fill the GPU PROGRAMS_PER_SM times over, but
    never more than one per MIN_SPLIT keys of the longest context allowed."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-PROGRAMS_PER_SM * sms // programs_per_split), -(-sized_for // MIN_SPLIT)))


def paged_decode(
    q: torch.Tensor,  # [batch, heads, d]: one new token per sequence
    key_cache: torch.Tensor,  # [slots, kv_heads, d]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [batch, max_pages] int32
    context_lens: torch.Tensor,  # [batch] int32, the new token included
    max_context: int,
    page_size: int,
    split_size: int,  # keys per split; 0: each context spread over ``num_splits`` (``split_length``)
    scale: float,
    chosen: torch.Tensor | None = None,  # [batch, kv_heads, splits] int32 head bitmask; None = dense
    num_splits: int | None = None,  # with split_size 0
) -> torch.Tensor:
    """Split-K attention of each new token over its paged context; only the chosen splits are read."""
    from longserve.attention.paged_triton import paged_split_decode_kernel

    batch, heads, dim = q.shape
    kv_heads = key_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits if split_size == 0 else -(-max_context // split_size)
    o_part = torch.empty(batch * heads * splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch * heads * splits, dtype=torch.float32, device=q.device)
    paged_split_decode_kernel[(splits, batch * kv_heads)](
        q, key_cache, value_cache, block_tables, context_lens, context_lens if chosen is None else chosen,
        o_part, lse,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), block_tables.stride(0),
        kv_heads, splits, split_size, scale * _LOG2E,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), PAGE=page_size, HEAD_DIM=dim,
        DIM_PAD=max(16, next_pow2(dim)), BLOCK_N=64,
        DOT_PRECISION=dot_precision(key_cache), DENSE=chosen is None, MIN_SPLIT=MIN_SPLIT,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [batch, heads, d] contiguous: merged rows
    merge_partials(o_part, lse, out, batch * heads, splits, (context_lens, heads, split_size))
    return out


def merge_partials(
    o_part: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    rows: int,
    slots: int,
    splits_of: tuple[torch.Tensor, int, int] | None = None,
) -> None:
    """out (viewed as [rows, d]) = log-sum-exp merge of each row's ``slots`` partials. ``splits_of``
    (context lengths [batch] int32, rows per sequence, split size as ``paged_decode`` takes it): the slots
    are context splits, and only those a row's context reached are read."""
    from longserve.attention.paged_triton import lse_merge_kernel

    block_r = 32
    context_lens, rows_per_seq, split_size = splits_of if splits_of is not None else (lse, 1, 1)
    lse_merge_kernel[(-(-rows // block_r),)](
        o_part, lse, out, context_lens, rows, slots, rows_per_seq, split_size,
        HEAD_DIM=out.shape[-1], DIM_PAD=max(16, next_pow2(out.shape[-1])), BLOCK_R=block_r,
        BY_CONTEXT=splits_of is not None, MIN_SPLIT=MIN_SPLIT,
        num_warps=4,
    )  # fmt: skip


def dot_precision(t: torch.Tensor) -> str:
    """float32 inputs keep float32 products (the engine's exact mode); tf32 would cost ~1e-3 relative."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
