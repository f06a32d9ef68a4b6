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


def check_engine_spans(device: str) -> None:
    """The engine's MoBA prefill wiring (``moba_paged``): a step holding a whole prompt and a chunk after a
    cached prefix (starting inside a page and inside a MoBA block), each span read through its own block-table
    row and gated over the means ``update_gate_keys`` stored in the cache, against the float64 oracle."""
    from longserve.attention.metadata import build_attention_metadata
    from longserve.attention.moba_paged import cuda_prefill, update_gate_keys
    from longserve.attention.paged_cache import allocate_kv_cache

    heads, kv_heads, dim, page, chunk, topk = 4, 2, 16, 8, 16, 3
    g = torch.Generator().manual_seed(7)
    lengths = {"whole": 40, "chunked": 67}  # "chunked": 37 tokens cached by an earlier step, 30 new
    qkv = {
        name: [torch.randn(n, h, dim, generator=g) for h in (heads, kv_heads, kv_heads)]
        for name, n in lengths.items()
    }
    pages = torch.randperm(30, generator=g) + 1  # shuffled; block 0 is the padding block
    tables = {"whole": pages[:5].tolist(), "chunked": pages[5:14].tolist()}
    (cache,) = allocate_kv_cache(1, 32, page, kv_heads, dim, torch.float32, device=device, gate_keys=True)

    def step(names: list[str], cached: list[int], new: list[int]):
        meta = build_attention_metadata([tables[n] for n in names], cached, new, page).to(device)
        rows = [slice(c, c + m) for c, m in zip(cached, new, strict=True)]
        q, k, v = (
            torch.cat([qkv[n][i][r] for n, r in zip(names, rows, strict=True)]).to(device) for i in range(3)
        )
        cache.write(k, v, meta.slot_mapping)
        update_gate_keys(cache, k, meta, chunk)
        return meta, q, k, v

    step(["chunked"], [0], [37])
    meta, q, k, v = step(["whole", "chunked"], [0, 37], [40, 30])
    for index, name in enumerate(["whole", "chunked"]):
        span = meta.prefills[index]
        rows = slice(span.query_start, span.query_start + span.query_len)
        out = cuda_prefill(q[rows], k[rows], v[rows], cache, meta, index, chunk, topk, dim**-0.5, sink=True)
        full = qkv[name]
        ref = moba_attention_oracle(*full, [lengths[name]], chunk, topk, dim**-0.5, sink=True)
        ref = ref[lengths[name] - span.query_len :]
        rel = float((out.double().cpu() - ref).norm() / ref.norm())
        assert rel < 1e-4, (name, rel)
