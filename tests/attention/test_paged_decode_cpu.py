"""The compiled CPU paged decode attention against the reference masked softmax, over shuffled block tables."""

from __future__ import annotations

import pytest
import torch

from longserve.attention.metadata import build_attention_metadata


def _paged_case(
    lengths: list[int], heads: int, kv_heads: int, dim: int, block: int, seed: int, dtype=torch.float32
):
    """Caches (of ``dtype``) holding each sequence's keys/values in shuffled blocks, and each sequence's dense
    keys/values."""
    gen = torch.Generator().manual_seed(seed)
    need = sum(-(-n // block) for n in lengths)
    order = (torch.randperm(need, generator=gen) + 1).tolist()  # block 0 stays the pad block
    key_cache = torch.randn((need + 1) * block, kv_heads, dim, generator=gen).to(dtype)
    value_cache = torch.randn((need + 1) * block, kv_heads, dim, generator=gen).to(dtype)
    tables, dense = [], []
    for n in lengths:
        table = [order.pop() for _ in range(-(-n // block))]
        slots = torch.tensor([table[p // block] * block + p % block for p in range(n)])
        tables.append(table)
        dense.append((key_cache[slots], value_cache[slots]))
    q = torch.randn(len(lengths), heads, dim, generator=gen)
    return q, key_cache, value_cache, tables, dense


def _softmax_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [heads, d] over keys/values [n, kv_heads, d] in float64."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [n, heads, d]
    v = values.double().repeat_interleave(group, dim=1)
    weights = torch.softmax(torch.einsum("hd,nhd->hn", q.double(), k) * scale, dim=-1)
    return torch.einsum("hn,nhd->hd", weights, v)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32-cache", "fp16-cache"])
@pytest.mark.parametrize(
    ("lengths", "heads", "kv_heads", "dim", "block"),
    [
        ([2, 17, 160, 5], 9, 3, 64, 16),  # the default model's shape, ragged contexts
        ([3000, 40], 4, 4, 32, 16),  # long enough to run in parallel; no grouping
        ([33, 7], 8, 2, 24, 8),  # a head size that is not a multiple of the vector width
        ([50, 300], 16, 2, 128, 16),  # head size 128, groups of 8
    ],
)
def test_paged_decode_matches_softmax_attention(lengths, heads, kv_heads, dim, block, cache_dtype) -> None:
    """Against float64 attention over the cache's own values (an fp16 cache's rows are widened exactly)."""
    from longserve.layers.cpu_kernels import cpu_kernels

    q, key_cache, value_cache, tables, dense = _paged_case(
        lengths, heads, kv_heads, dim, block, seed=len(lengths), dtype=cache_dtype
    )
    metadata = build_attention_metadata(tables, [n - 1 for n in lengths], [1] * len(lengths), block)
    scale = dim**-0.5
    out = cpu_kernels().paged_decode(
        q, key_cache, value_cache, metadata.decode_block_tables, metadata.decode_seq_lens, block, scale
    )
    for i, (keys, values) in enumerate(dense):
        expected = _softmax_attention(q[i], keys, values, scale)
        torch.testing.assert_close(out[i].double(), expected, rtol=2e-5, atol=2e-6)


def test_paged_decode_rejects_tables_outside_the_cache() -> None:
    from longserve.layers.cpu_kernels import cpu_kernels

    q, key_cache, value_cache, tables, _ = _paged_case([20], 2, 1, 16, 16, seed=0)
    lens = torch.tensor([20], dtype=torch.int32)
    bad = torch.tensor([[tables[0][0], 999]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels().paged_decode(q, key_cache, value_cache, bad, lens, 16, 1.0)
    with pytest.raises(RuntimeError, match="outside the block table"):
        cpu_kernels().paged_decode(
            q, key_cache, value_cache, bad, torch.tensor([33], dtype=torch.int32), 16, 1.0
        )


def test_a_sequence_attends_the_same_alone_and_in_a_batch() -> None:
    """Each (sequence, KV head) is one task over its own context, so a row's output never depends on what else
    decodes with it (the low-bit matmuls are batch-invariant too: greedy output alone equals batched)."""
    from longserve.layers.cpu_kernels import cpu_kernels

    lengths = [128, 129, 256, 700, 3]
    q, key_cache, value_cache, tables, dense = _paged_case(lengths, 9, 3, 64, 16, seed=7)
    metadata = build_attention_metadata(tables, [n - 1 for n in lengths], [1] * len(lengths), 16)
    run = lambda rows: cpu_kernels().paged_decode(  # noqa: E731
        q[rows], key_cache, value_cache, metadata.decode_block_tables[rows],
        metadata.decode_seq_lens[rows], 16, 0.125,
    )  # fmt: skip
    batched = run(slice(None))
    for i, (keys, values) in enumerate(dense):
        assert torch.equal(run(slice(i, i + 1))[0], batched[i])
        torch.testing.assert_close(
            batched[i].double(), _softmax_attention(q[i], keys, values, 0.125), rtol=2e-5, atol=2e-6
        )
