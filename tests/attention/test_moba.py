"""MoBA reference and gating against the float64 loop oracle: selection, GQA, packing, ties, edge top-k."""

import pytest
import torch
import torch.nn.functional as F
from moba_oracle import masked_attention_oracle, moba_attention_oracle, moba_mask_oracle

from longserve.attention.moba import MobaAttention, moba_attend, moba_attention_reference
from longserve.attention.moba_gating import moba_gate_keys, select_moba_blocks
from longserve.attention.moba_params import validate_moba_params


def _qkv(total, heads, kv_heads, dim=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, h, dim, generator=g, dtype=dtype) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize(
    ("lens", "heads", "kv_heads", "chunk", "topk"),
    [
        ([100], 8, 2, 16, 3),  # GQA, a partial last block
        ([37, 64, 90], 4, 4, 16, 2),  # packed sequences of different lengths, one a whole number of blocks
        ([130, 5], 8, 2, 32, 3),
        ([96], 2, 1, 16, 4),  # MQA
    ],
)
def test_reference_matches_the_loop_oracle(lens, heads, kv_heads, chunk, topk):
    q, k, v = _qkv(sum(lens), heads, kv_heads)
    out = moba_attention_reference(q, k, v, lens, chunk, topk)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, moba_attention_oracle(q, k, v, lens, chunk, topk), rtol=1e-10, atol=1e-10)


def test_reference_is_the_same_whatever_the_query_slicing():
    q, k, v = _qkv(90, 4, 2, seed=1)
    positions = torch.arange(90)
    whole = moba_attend(q, k, v, positions, 16, 2, 0.25, query_rows=1000)
    torch.testing.assert_close(moba_attend(q, k, v, positions, 16, 2, 0.25, query_rows=7), whole)
    torch.testing.assert_close(moba_attention_reference(q, k, v, [90], 16, 2, scale=0.25), whole)


def test_topk_1_is_causal_attention_within_each_block():
    lens = [70]
    q, k, v = _qkv(70, 4, 2, seed=2)
    block = torch.arange(70) // 16
    mask = (block[:, None] == block[None, :]) & torch.ones(70, 70, dtype=torch.bool).tril()
    expected = masked_attention_oracle(q, k, v, mask.expand(4, 70, 70), 16**-0.5)
    torch.testing.assert_close(
        moba_attention_reference(q, k, v, lens, 16, 1), expected, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(moba_attention_oracle(q, k, v, lens, 16, 1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_covering_every_block_is_full_causal_attention(dtype):
    q, k, v = _qkv(100, 8, 2, seed=3, dtype=dtype)
    out = moba_attention_reference(q, k, v, [100], 16, 7)  # 7 blocks: the own one and up to 6 earlier
    causal = F.scaled_dot_product_attention(
        *(t.transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype
    torch.testing.assert_close(out, causal, rtol=tol, atol=tol)


def test_ties_go_to_the_earlier_block():
    q, k, v = _qkv(80, 4, 2, seed=4)
    k[16:32] = k[0:16]  # blocks 0, 1 and 2 have bit-identical gate keys: every query ties among them
    k[32:48] = k[0:16]
    v[16:48] += 5.0  # different values, so the output shows which block was taken
    gate = moba_gate_keys(k, 16)
    assert torch.equal(gate[0], gate[1]) and torch.equal(gate[0], gate[2])
    positions = torch.arange(80)
    selected = select_moba_blocks(q, gate, positions, 16, 2)  # [80, 4, 1]
    # Block 3 (rows 48..63) scores blocks 0-2 equally; block 4 also scores block 3, which may win.
    assert torch.all(selected[48:64] == 0)
    assert torch.all(selected[16:32] == 0)  # one earlier block: block 0
    assert torch.all(selected[:16] == -1)  # no earlier block
    for topk in (2, 3):
        torch.testing.assert_close(
            moba_attention_reference(q, k, v, [80], 16, topk),
            moba_attention_oracle(q, k, v, [80], 16, topk),
            rtol=1e-10,
            atol=1e-10,
        )


def test_selection_picks_only_complete_earlier_blocks_best_first():
    q, k, _ = _qkv(75, 8, 2, seed=5)
    gate = moba_gate_keys(k, 16)
    assert gate.shape == (4, 2, 16)  # 75 tokens: 4 complete chunks, the partial 5th has no gate key
    positions = torch.arange(75)
    selected = select_moba_blocks(q, gate, positions, 16, 4)  # [75, 8, 3]
    own = (positions // 16)[:, None, None]
    assert torch.all(selected < own)
    for t in (20, 40, 74):
        scores = torch.einsum("hd,bhd->hb", q[t], gate.repeat_interleave(4, dim=1))  # [heads, blocks]
        for h in range(8):
            picks = selected[t, h][selected[t, h] >= 0]
            assert len(picks) == min(3, t // 16)
            assert torch.all(scores[h, picks][:-1] >= scores[h, picks][1:])  # best first
            others = [b for b in range(t // 16) if b not in picks.tolist()]
            assert all(scores[h, b] <= scores[h, picks].min() for b in others)


def test_oracle_mask_is_own_block_causal_plus_chosen_blocks():
    q, k, _ = _qkv(40, 2, 1, seed=6)
    mask = moba_mask_oracle(q, k, 16, 2)
    assert mask[:, 39].sum(-1).tolist() == [16 + 8, 16 + 8]  # one earlier block + positions 32..39
    assert mask[:, 5].sum(-1).tolist() == [6, 6]
    assert not mask.triu(1).any()


@pytest.mark.parametrize("chunk_size", [0, 8, 24, -16, 16.0, True])
def test_bad_chunk_size_is_rejected(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 16"):
        validate_moba_params(chunk_size, 3)


@pytest.mark.parametrize("topk", [0, -1, 2.0])
def test_bad_topk_is_rejected_everywhere(topk):
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        validate_moba_params(16, topk)
    with pytest.raises(ValueError, match="topk"):
        MobaAttention(16, topk)
    q, k, v = _qkv(20, 2, 1)
    with pytest.raises(ValueError, match="topk"):
        moba_attention_reference(q, k, v, [20], 16, topk)


def test_reference_rejects_lengths_that_do_not_match():
    q, k, v = _qkv(20, 2, 1)
    with pytest.raises(ValueError, match="seq_lens sum to 19"):
        moba_attention_reference(q, k, v, [10, 9], 16, 2)


@pytest.mark.parametrize(
    ("sink", "window", "topk"),
    [(True, 0, 2), (False, 40, 4), (True, 17, 4), (True, 1, 2)],  # window 1: the own block only
)
def test_sink_and_window_blocks_are_attended_whatever_the_gating(sink, window, topk):
    lens, heads, kv_heads, chunk = [150, 70], 4, 2, 16
    q, k, v = _qkv(sum(lens), heads, kv_heads, seed=7)
    out = moba_attention_reference(q, k, v, lens, chunk, topk, sink=sink, window=window)
    want = moba_attention_oracle(q, k, v, lens, chunk, topk, sink=sink, window=window)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    plain = moba_attention_oracle(q, k, v, lens, chunk, topk)
    assert not torch.allclose(want, plain)  # the options change what is attended
    mask = moba_mask_oracle(q[:150], k[:150], chunk, topk, sink, window)
    if sink:
        assert mask[:, chunk:, :chunk].all()  # every query past the first block sees block 0
    if window:
        for t in range(0, 150, 7):
            assert mask[:, t, max(0, t - window + 1) : t + 1].all()


def test_forced_blocks_must_fit_the_topk():
    validate_moba_params(16, 3, sink=True, window=17)  # block 0 and one window block: 2 of 2 choices
    with pytest.raises(ValueError, match="raise topk to at least 4"):
        validate_moba_params(16, 3, sink=True, window=18)
    with pytest.raises(ValueError, match="window must be"):
        validate_moba_params(16, 3, window=-1)
