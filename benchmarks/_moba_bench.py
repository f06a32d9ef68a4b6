"""Pieces of benchmarks/moba_attention.py: a float64 MoBA oracle for the GPU checks, the full-attention
baselines, a paged KV cache for the decode runs, and event timing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def oracle_moba(q, k, v, chunk: int, topk: int, scale: float, q_start: int = 0) -> torch.Tensor:
    """float64 MoBA from the explicit [heads, queries, keys] mask (stable sort: ties go to the earlier block)."""
    queries, heads, dim = q.shape
    seq, kv_heads = k.shape[:2]
    group = heads // kv_heads
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    pos = torch.arange(q_start, q_start + queries, device=q.device)
    own = pos // chunk  # [queries]
    key_block = torch.arange(seq, device=q.device) // chunk  # [seq]
    mask = (key_block[None, :] == own[:, None]) & (
        torch.arange(seq, device=q.device)[None, :] <= pos[:, None]
    )
    mask = mask[None].expand(heads, queries, seq).clone()
    blocks = seq // chunk
    if topk > 1 and blocks:
        gates = k64[: blocks * chunk].view(blocks, chunk, heads, dim).mean(1)  # [blocks, heads, d]
        scores = torch.einsum("qhd,bhd->hqb", q64, gates)
        scores = scores.masked_fill(
            torch.arange(blocks, device=q.device)[None, None, :] >= own[None, :, None], -math.inf
        )
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : topk - 1]
        picked = torch.gather(scores, -1, order) > -math.inf
        chosen = torch.zeros(heads, queries, blocks + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(picked, order, blocks), True)
        mask |= chosen[..., key_block.clamp(max=blocks)] & (key_block < blocks)[None, None, :]
    s = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, -math.inf).softmax(-1), v64)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median of ``reps`` event-timed runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_memory_gb(fn: Callable[[], object]) -> float:
    """Extra device memory a call needs at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def full_attention(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """Causal SDPA over [1, heads, seq, d] tensors, K/V already expanded to the query heads."""

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def gqa_decode(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One decode step through SDPA: q [batch, heads, d], k/v [batch, kv_heads, ctx, d] (GQA, not expanded)."""

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

    return run


def paged_cache(batch: int, context: int, kv_heads: int, dim: int, page: int, dtype, seed: int = 0):
    """Random keys/values in a paged cache whose pages are shuffled: (k_cache, v_cache, block_tables)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages_per_seq = -(-context // page)
    num_pages = batch * pages_per_seq + 1
    k_cache = torch.randn(num_pages * page, kv_heads, dim, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(num_pages * page, kv_heads, dim, device="cuda", dtype=dtype, generator=g)
    perm = torch.randperm(num_pages - 1, device="cuda", generator=g) + 1
    tables = perm[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def gather_context(cache: torch.Tensor, table: torch.Tensor, length: int, page: int) -> torch.Tensor:
    """One sequence's [length, kv_heads, d] from the paged cache."""
    pos = torch.arange(length, device=cache.device)
    return cache[table[pos // page].long() * page + pos % page]


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
