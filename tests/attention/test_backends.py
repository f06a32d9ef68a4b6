"""Dense attention (SDPA + paged decode) equals the masked-softmax reference on random paged layouts."""

import pytest
import torch
from paged_runner import run_backend_steps

from longserve.attention.backend import get_backend
from longserve.attention.reference import masked_softmax

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 16, 4


def _explicit_causal_attention(q, k, v, scale):
    """Plain float64 causal attention over one whole sequence: q [n, h, d], k/v [n, kvh, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _run_steps(backend_name, seqs, chunks, dtype):
    return run_backend_steps(get_backend(backend_name), seqs, chunks, BLOCK, dtype)


@pytest.mark.parametrize("backend_name", ["reference", "dense"])
def test_chunked_prefill_and_decode_match_whole_sequence_attention(backend_name):
    torch.manual_seed(0)
    lengths = [13, 7, 22]
    seqs = [
        tuple(torch.randn(n, h, DIM, dtype=torch.float64) for h in (HEADS, KV_HEADS, KV_HEADS))
        for n in lengths
    ]
    # step pattern: a first chunk for each, then decodes and chunks mixed in the same steps
    chunks = [[5, 3, 9], [1, 1, 6], [4, 1, 7], [1, 1, 0], [1, 1, 0]]
    remaining = [n - sum(c[i] for c in chunks) for i, n in enumerate(lengths)]
    while any(remaining):
        chunks.append([1 if r else 0 for r in remaining])
        remaining = [max(0, r - 1) for r in remaining]
    outs = _run_steps(backend_name, seqs, chunks, torch.float64)
    for (q, k, v), out in zip(seqs, outs, strict=True):
        expected = _explicit_causal_attention(q, k, v, DIM**-0.5)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_dense_matches_reference_in_float32_with_padded_decode_batch():
    torch.manual_seed(1)
    lengths = [3, 17, 30, 9]
    seqs = [tuple(torch.randn(n, h, DIM) for h in (HEADS, KV_HEADS, KV_HEADS)) for n in lengths]
    chunks = [[3, 10, 20, 9], [0, 7, 10, 0]]
    ref = _run_steps("reference", seqs, chunks, torch.float32)
    dense = _run_steps("dense", seqs, chunks, torch.float32)
    for a, b in zip(ref, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masked_softmax_gives_zero_weight_past_valid_length():
    scores = torch.randn(2, 3, 5)
    weights = masked_softmax(scores, torch.tensor([1, 3, 5]))
    assert torch.all(weights[:, 0, 1:] == 0) and torch.all(weights[:, 1, 3:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(weights[:, 2], scores[:, 2].softmax(-1))
