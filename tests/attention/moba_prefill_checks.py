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
