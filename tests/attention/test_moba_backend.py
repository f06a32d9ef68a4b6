"""The paged ``moba`` backend: prefill, chunked prefill, decode and mixed batches equal the MoBA reference."""

import pytest
import torch
from paged_runner import run_backend_steps

from longserve.attention.backend import get_backend
from longserve.attention.moba import MobaAttention, moba_attention_reference

HEADS, KV_HEADS, DIM, BLOCK, CHUNK, TOPK = 4, 2, 16, 4, 16, 2


def _seqs(lengths, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(n, h, DIM, generator=g, dtype=dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        for n in lengths
    ]


def _expected(seq, topk=TOPK):
    q, k, v = seq
    return moba_attention_reference(q, k, v, [len(q)], CHUNK, topk)


def _decodes_to_the_end(chunks, lengths):
    """Append single-token steps until every sequence is complete."""
    remaining = [n - sum(c[i] for c in chunks) for i, n in enumerate(lengths)]
    while any(remaining):
        chunks.append([1 if r else 0 for r in remaining])
        remaining = [max(0, r - 1) for r in remaining]
    return chunks


def test_whole_prefill_matches_the_reference():
    seqs = _seqs([70])
    (out,) = run_backend_steps(MobaAttention(CHUNK, TOPK), seqs, [[70]], BLOCK, torch.float64)
    torch.testing.assert_close(out, _expected(seqs[0]), rtol=1e-10, atol=1e-10)


def test_prefill_then_stepwise_decode_equals_one_prefill():
    seqs = _seqs([70], seed=1)
    backend = MobaAttention(CHUNK, TOPK)
    (whole,) = run_backend_steps(backend, seqs, [[70]], BLOCK, torch.float64)
    (stepwise,) = run_backend_steps(backend, seqs, _decodes_to_the_end([[20]], [70]), BLOCK, torch.float64)
    torch.testing.assert_close(stepwise, whole, rtol=1e-10, atol=1e-10)


def test_chunked_prefill_equals_one_prefill():
    seqs = _seqs([90], seed=2)
    backend = MobaAttention(CHUNK, 3)
    # Chunks start mid-block, end on block boundaries and span several blocks.
    (chunked,) = run_backend_steps(backend, seqs, [[5], [11], [16], [17], [41]], BLOCK, torch.float64)
    torch.testing.assert_close(chunked, _expected(seqs[0], topk=3), rtol=1e-10, atol=1e-10)


def test_mixed_decode_and_prefill_batches():
    lengths = [53, 7, 81, 40]
    seqs = _seqs(lengths, seed=3)
    # Each step mixes decodes (padded to different context lengths) with prompt chunks of other sequences.
    chunks = _decodes_to_the_end(
        [[20, 3, 33, 0], [1, 1, 30, 17], [1, 1, 1, 1], [9, 1, 1, 12], [1, 0, 2, 1]], lengths
    )
    outs = run_backend_steps(MobaAttention(CHUNK, TOPK), seqs, chunks, BLOCK, torch.float64)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out, _expected(seq), rtol=1e-10, atol=1e-10)


def test_float32_backend_matches_float32_reference_and_covers_dense_when_topk_is_large():
    lengths = [66, 35]
    seqs = _seqs(lengths, dtype=torch.float32, seed=4)
    chunks = _decodes_to_the_end([[30, 35], [20, 0]], lengths)
    sparse = run_backend_steps(MobaAttention(CHUNK, TOPK), seqs, chunks, BLOCK, torch.float32)
    full = run_backend_steps(MobaAttention(CHUNK, 5), seqs, chunks, BLOCK, torch.float32)
    dense = run_backend_steps(get_backend("dense"), seqs, chunks, BLOCK, torch.float32)
    for seq, out, out_full, out_dense in zip(seqs, sparse, full, dense, strict=True):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, _expected(seq), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_full, out_dense, rtol=1e-5, atol=1e-5)
    # Past topk * chunk tokens MoBA drops blocks: it must differ from dense there, and only there.
    assert (sparse[0][: TOPK * CHUNK] - dense[0][: TOPK * CHUNK]).abs().max() < 1e-5
    assert (sparse[0][TOPK * CHUNK :] - dense[0][TOPK * CHUNK :]).abs().max() > 1e-2


def test_get_backend_points_moba_users_to_its_parameters():
    with pytest.raises(ValueError, match="moba needs a chunk size and top-k"):
        get_backend("moba")
