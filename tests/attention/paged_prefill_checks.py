"""The paged prefill kernel against float64 causal attention (test_paged_prefill_kernel.py runs it on a GPU
and through Triton's interpreter on the CPU): a varlen batch of chunks whose cached prefixes end anywhere in
a block, shuffled block tables, GQA groups and head sizes."""

from __future__ import annotations

import torch

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # bf16 operands; float32 with IEEE products
PAGE = 16


def check_paged_prefill(
    device: str, chunks: list[tuple[int, int]], dims, groups, dtype=torch.bfloat16
) -> None:
    """``chunks``: (cached prefix, chunk length) per sequence."""
    from longserve.attention.paged_prefill import paged_prefill

    kv_heads = 2
    g = torch.Generator().manual_seed(len(chunks))
    contexts = [prefix + length for prefix, length in chunks]
    pages = [-(-n // PAGE) for n in contexts]
    order = torch.randperm(sum(pages), generator=g) + 1  # block 0 stays the padding block
    tables = torch.zeros(len(chunks), max(pages), dtype=torch.int32)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = order[start : start + count]
        start += count
    lengths = [length for _, length in chunks]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for dim in dims:
        for group in groups:
            heads = kv_heads * group
            shape = ((sum(pages) + 1) * PAGE, kv_heads, dim)
            k_cache = torch.randn(shape, generator=g).to(device, dtype)
            v_cache = torch.randn(shape, generator=g).to(device, dtype)
            q = torch.randn(sum(lengths), heads, dim, generator=g).to(device, dtype)
            context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
            out = paged_prefill(
                q,
                k_cache,
                v_cache,
                tables.to(device),
                starts.to(device),
                context_lens,
                max(lengths),
                PAGE,
                dim**-0.5,
            )
            assert torch.isfinite(out).all()
            for seq, (prefix, length) in enumerate(chunks):
                context = prefix + length
                pos = torch.arange(context, device=device)
                slots = tables.to(device)[seq, pos // PAGE].long() * PAGE + pos % PAGE
                keys = k_cache[slots].double().repeat_interleave(group, 1)  # [context, heads, d]
                values = v_cache[slots].double().repeat_interleave(group, 1)
                rows = slice(int(starts[seq]), int(starts[seq + 1]))
                scores = torch.einsum("qhd,khd->hqk", q[rows].double(), keys) * dim**-0.5
                causal = pos[None, :] <= (prefix + torch.arange(length, device=device))[:, None]  # [q, k]
                weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                want = torch.einsum("hqk,khd->qhd", weights, values)
                error = float((out[rows].double() - want).norm() / want.norm())
                assert error < TOLERANCE[dtype], (dim, group, prefix, length, error)
