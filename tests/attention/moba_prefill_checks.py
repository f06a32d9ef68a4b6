"""MoBA's prefill attention kernel against the float64 loop oracle, runnable on CUDA or, under
TRITON_INTERPRET=1, on the CPU (test_moba_prefill_kernel.py runs it both ways)."""

from __future__ import annotations

import torch
from moba_oracle import moba_attention_oracle

from longserve.attention import moba_cuda


def check_prefill(device: str, cases, dtype: torch.dtype, tolerance: float) -> None:
    """``cases``: (tokens, heads, kv_heads, head_dim, chunk, topk) each, one sequence apiece."""
    for seed, (n, heads, kv_heads, dim, chunk, topk) in enumerate(cases):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(n, h, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
        out = torch.full_like(q, float("nan"))
        moba_cuda.moba_prefill_sequence(q, k, v, chunk, topk, dim**-0.5, out=out, window_tokens=40)
        ref = moba_attention_oracle(q.cpu(), k.cpu(), v.cpu(), [n], chunk, topk, dim**-0.5)
        rel = float((out.double().cpu() - ref.double()).norm() / ref.double().norm())
        assert rel < tolerance, (n, heads, kv_heads, dim, chunk, topk, rel)


def check_paged_prefill(device: str, cases, dtype: torch.dtype, tolerance: float) -> None:
    """``cases``: (tokens, heads, kv_heads, head_dim, chunk, topk, page, q_start, sink, window): the queries
    from ``q_start`` on, read from a paged cache with shuffled pages, against the oracle and against the same
    queries over the contiguous keys (equal: paging changes only where keys are read)."""
    for seed, (n, heads, kv_heads, dim, chunk, topk, page, q_start, sink, window) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + seed)
        q, k, v = (torch.randn(n, h, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
        pages = -(-n // page)
        table = (torch.randperm(pages + 3, generator=g)[:pages] + 1).to(torch.int32)  # block 0 stays unused
        slots = (table.long()[torch.arange(n) // page] * page + torch.arange(n) % page).to(device)
        k_cache = torch.full(((pages + 4) * page, kv_heads, dim), float("nan"), dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, float("nan"))  # a slot read that is not the sequence's shows
        k_cache[slots], v_cache[slots] = k, v
        gates = moba_cuda.gate_keys(k, chunk)
        options = dict(sink=sink, window=window, window_tokens=40)
        out = moba_cuda.moba_prefill_paged(
            q[q_start:], k_cache, v_cache, table.to(device), page, n, gates, chunk, topk, dim**-0.5, **options
        )
        contiguous = moba_cuda.moba_prefill_sequence(q[q_start:], k, v, chunk, topk, dim**-0.5, **options)
        assert torch.equal(out, contiguous), (n, chunk, page, q_start)
        ref = moba_attention_oracle(q.cpu(), k.cpu(), v.cpu(), [n], chunk, topk, dim**-0.5, sink, window)
        rel = float((out.double().cpu() - ref[q_start:]).norm() / ref[q_start:].norm())
        assert rel < tolerance, (n, heads, kv_heads, dim, chunk, topk, page, q_start, rel)
