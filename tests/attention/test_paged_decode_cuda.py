"""The dense paged decode kernel (Triton) against float64 attention: shuffled block tables, ragged contexts of
1 to 40K keys, head sizes 64 and 128, GQA groups 1 to 8, splits as the engine sizes them; skipped without a
GPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from longserve.attention import paged_decode  # noqa: E402

BF16_TOL = 2e-2  # relative error of bf16 operands with float32 accumulation
PAGE = 16


def _paged_cache(lens: list[int], kv_heads: int, dim: int, seed: int):
    """A bf16 cache holding every context in shuffled pages, and each sequence's block table."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // PAGE) for n in lens]
    shape = ((sum(pages) + 1) * PAGE, kv_heads, dim)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(seed)) + 1
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = order[start : start + count]
        start += count
    return k_cache, v_cache, tables.cuda()


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_dense_decode_matches_float64_attention(dim, group):
    kv_heads = 2
    heads = kv_heads * group
    lens = [1, 17, 300, 4096, 40_000, 2, 1023]
    k_cache, v_cache, tables = _paged_cache(lens, kv_heads, dim, seed=dim + group)
    q = torch.randn(len(lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for sized_for in (max(lens), 139_264):
        splits = paged_decode.dense_splits(len(lens) * kv_heads, sized_for, q.device)
        out = paged_decode.paged_decode(
            q, k_cache, v_cache, tables, context_lens, max(lens), PAGE, 0, dim**-0.5, num_splits=splits
        )
        for row, n in enumerate(lens):
            pos = torch.arange(n, device="cuda")
            slots = tables[row, pos // PAGE].long() * PAGE + pos % PAGE
            keys = k_cache[slots].double().repeat_interleave(group, 1)  # [n, heads, d]
            values = v_cache[slots].double().repeat_interleave(group, 1)
            weights = torch.einsum("hd,nhd->hn", q[row].double(), keys).mul(dim**-0.5).softmax(-1)
            want = torch.einsum("hn,nhd->hd", weights, values)  # [heads, d]
            error = float((out[row].double() - want).norm() / want.norm())
            assert error < BF16_TOL, (dim, group, n, sized_for, error)
