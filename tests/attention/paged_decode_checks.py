"""The dense paged decode kernel against float64 attention (test_paged_decode_kernel.py): shuffled block
tables, ragged contexts, any head size up to 256 (powers of two and MLA's padded ones), GQA groups, and
splits as the engine sizes them."""

from __future__ import annotations

import torch

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # bf16 operands; float32 with IEEE products
PAGE = 16


def paged_cache(lens: list[int], kv_heads: int, dim: int, device: str, seed: int, dtype=torch.bfloat16):
    """A cache holding every context in shuffled pages, and each sequence's block table."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE) for n in lens]
    shape = ((sum(pages) + 1) * PAGE, kv_heads, dim)
    k_cache = torch.randn(shape, generator=g).to(device, dtype)
    v_cache = torch.randn(shape, generator=g).to(device, dtype)
    order = torch.randperm(sum(pages), generator=g) + 1
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = order[start : start + count]
        start += count
    return k_cache, v_cache, tables.to(device)


def check_dense_decode(
    device: str, lens: list[int], dims, groups, split_counts, dtype: torch.dtype = torch.bfloat16
) -> None:
    from longserve.attention import paged_decode

    kv_heads = 2
    for dim in dims:
        for group in groups:
            heads = kv_heads * group
            k_cache, v_cache, tables = paged_cache(lens, kv_heads, dim, device, dim + group, dtype)
            q = torch.randn(len(lens), heads, dim, generator=torch.Generator().manual_seed(dim))
            q = q.to(device, dtype)
            context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
            for splits in split_counts:
                out = paged_decode.paged_decode(
                    q,
                    k_cache,
                    v_cache,
                    tables,
                    context_lens,
                    max(lens),
                    PAGE,
                    0,
                    dim**-0.5,
                    num_splits=splits,
                )
                assert torch.isfinite(out).all()
                for row, n in enumerate(lens):
                    pos = torch.arange(n, device=device)
                    slots = tables[row, pos // PAGE].long() * PAGE + pos % PAGE
                    keys = k_cache[slots].double().repeat_interleave(group, 1)  # [n, heads, d]
                    values = v_cache[slots].double().repeat_interleave(group, 1)
                    weights = torch.einsum("hd,nhd->hn", q[row].double(), keys).mul(dim**-0.5).softmax(-1)
                    want = torch.einsum("hn,nhd->hd", weights, values)  # [heads, d]
                    error = float((out[row].double() - want).norm() / want.norm())
                    assert error < TOLERANCE[dtype], (dim, group, n, splits, error)
