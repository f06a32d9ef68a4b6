"""MoBA's CUDA kernels (Triton) against the float64 loop oracle and the torch reference; skipped without a GPU."""

import pytest
import torch
from moba_oracle import moba_attention_oracle

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from longserve.attention import moba_cuda, paged_decode  # noqa: E402
from longserve.attention.moba import moba_attention_reference  # noqa: E402

BF16_TOL = 2e-2  # relative error of bf16 operands with float32 accumulation


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


def _qkv(n, heads, kv_heads, dim=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(
        torch.randn(n, h, dim, device="cuda", dtype=dtype, generator=g) for h in (heads, kv_heads, kv_heads)
    )


@pytest.mark.parametrize(
    ("n", "heads", "kv_heads", "chunk", "topk"),
    [(300, 4, 2, 32, 3), (257, 8, 8, 64, 2), (200, 4, 1, 16, 1), (130, 2, 2, 32, 10)],
)
def test_prefill_kernel_matches_the_loop_oracle(n, heads, kv_heads, chunk, topk):
    q, k, v = _qkv(n, heads, kv_heads)
    out = torch.full_like(q, float("nan"))
    moba_cuda.moba_prefill_sequence(q, k, v, chunk, topk, 64**-0.5, out=out, window_tokens=100)
    ref = moba_attention_oracle(q.cpu(), k.cpu(), v.cpu(), [n], chunk, topk, 64**-0.5)
    assert _rel(out, ref) < BF16_TOL


def test_prefill_kernel_matches_the_reference_over_packed_sequences_and_chunked_queries():
    lens, chunk, topk = [1000, 333, 2048], 128, 4
    q, k, v = _qkv(sum(lens), 16, 4, dim=128, seed=1)
    out = moba_cuda.moba_prefill(q, k, v, lens, chunk, topk)
    ref = moba_attention_reference(q.double(), k.double(), v.double(), lens, chunk, topk)
    assert _rel(out, ref) < BF16_TOL
    # The last 300 queries of the first sequence against its whole context (a chunked prefill).
    part = moba_cuda.moba_prefill_sequence(q[700:1000], k[:1000], v[:1000], chunk, topk, 128**-0.5)
    assert _rel(part, ref[700:1000]) < BF16_TOL


def test_gpu_block_selection_equals_the_torch_path_including_ties():
    q, k, _ = _qkv(600, 8, 2, dtype=torch.float32, seed=2)
    gates = moba_cuda.gate_keys(k, 32)
    gates[5] = gates[2]  # exact ties: the earlier block must win
    positions = torch.arange(600, device="cuda")
    kernel = moba_cuda.select_prefill_blocks(q, positions, gates, 32, 5)
    torch_path = moba_cuda.select_prefill_blocks(q.cpu(), positions.cpu(), gates.cpu(), 32, 5)

    def as_sets(x):
        return torch.cat([x[..., :-1].sort(-1).values, x[..., -1:]], -1).cpu()

    assert torch.equal(as_sets(kernel), as_sets(torch_path))


def _paged(lens, kv_heads, dim, page, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // page) for n in lens]
    k_cache = torch.randn(
        (sum(pages) + 1) * page, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g
    )
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(seed)) + 1
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for row, count in enumerate(pages):
        tables[row, :count] = order[start : start + count]
        start += count
    return k_cache, v_cache, tables.cuda()


def _context(cache, table, n, page):
    pos = torch.arange(n, device="cuda")
    return cache[table[pos // page].long() * page + pos % page]


def test_paged_decode_kernels_match_the_oracle():
    lens, heads, kv_heads, dim, page, chunk, topk = [700, 129, 512], 8, 2, 64, 16, 64, 3
    k_cache, v_cache, tables = _paged(lens, kv_heads, dim, page)
    q = torch.randn(len(lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    gate_cache = torch.zeros(k_cache.shape[0] // page, kv_heads, dim, device="cuda")
    for row, n in enumerate(lens):
        gates = moba_cuda.gate_keys(_context(k_cache, tables[row], n, page), chunk)
        gate_cache[tables[row, :: chunk // page][: gates.shape[0]].long()] = gates
    # The gate kernel's picks against the torch path's first: a wrong pick and a wrong sum fail apart.
    picks = [max(lens), page, chunk, topk]
    kernel = moba_cuda.select_decode_blocks(q, gate_cache, tables, context_lens, *picks)
    torch_path = moba_cuda.select_decode_blocks(
        q.cpu(), gate_cache.cpu(), tables.cpu(), context_lens.cpu(), *picks
    )
    assert torch.equal(kernel.cpu(), torch_path), (kernel.cpu(), torch_path)
    moba = moba_cuda.moba_paged_decode(
        q, k_cache, v_cache, tables, context_lens, max(lens), page, gate_cache, chunk, topk, dim**-0.5
    )
    dense = paged_decode.paged_decode(
        q, k_cache, v_cache, tables, context_lens, max(lens), page, 128, dim**-0.5
    )
    for row, n in enumerate(lens):
        keys = _context(k_cache, tables[row], n, page)
        values = _context(v_cache, tables[row], n, page)
        # The decode token is the last position: its row of a whole-sequence MoBA.
        qs = torch.cat([torch.zeros(n - 1, heads, dim, device="cuda", dtype=q.dtype), q[row : row + 1]])
        ref = moba_attention_reference(qs.double(), keys.double(), values.double(), [n], chunk, topk)[-1:]
        every_block = -(-n // chunk) + 1  # picks are [tokens, heads, topk - 1]: no larger than needed
        full = moba_attention_reference(qs.double(), keys.double(), values.double(), [n], chunk, every_block)
        full = full[-1:]
        assert _rel(moba[row : row + 1], ref) < BF16_TOL, (row, n, _rel(moba[row : row + 1], ref))
        assert _rel(dense[row : row + 1], full) < BF16_TOL, (row, n, _rel(dense[row : row + 1], full))


def test_dense_decode_sized_for_a_much_longer_context_reads_only_what_is_there():
    """The engine sizes splits for its longest possible context (CUDA graphs); the merge reads only the
    splits each context reached, also when one merge block holds rows of short and long contexts."""
    lens, heads, kv_heads, dim, page = [3, 700, 129, 1, 2049], 8, 2, 64, 16
    k_cache, v_cache, tables = _paged(lens, kv_heads, dim, page, seed=5)
    q = torch.randn(len(lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # (max_context, split size, splits): fixed splits, then each context spread over a fixed number of splits.
    cases = [(max(lens), 128, None), (139_264, 1024, None), (139_264, 64, None)]
    cases += [(139_264, 0, 1), (139_264, 0, 7), (139_264, 0, 66)]
    for max_context, split, splits in cases:
        out = paged_decode.paged_decode(
            q, k_cache, v_cache, tables, context_lens, max_context, page, split, dim**-0.5, num_splits=splits
        )
        for row, n in enumerate(lens):
            keys = _context(k_cache, tables[row], n, page).double().repeat_interleave(heads // kv_heads, 1)
            values = _context(v_cache, tables[row], n, page).double().repeat_interleave(heads // kv_heads, 1)
            weights = torch.einsum("hd,nhd->hn", q[row].double(), keys).mul(dim**-0.5).softmax(-1)
            full = torch.einsum("hn,nhd->hd", weights, values)  # [heads, d]
            assert _rel(out[row], full) < BF16_TOL, (max_context, split, splits, n)
