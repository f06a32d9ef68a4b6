"""``longserve viz moba``: the block map is the gating's own selection, and it is drawn."""

from __future__ import annotations

import pytest
import torch

from longserve.attention.moba_gating import moba_gate_keys, select_moba_blocks
from longserve.viz import capture_attention, capture_moba
from longserve.viz.cli import main

CHUNK, TOPK = 16, 3
TEXT = (
    "Attention lets every position look back at earlier positions; the key and value cache keeps them. "
    "Paged memory splits the cache into fixed-size blocks, so sequences of any length share one pool. "
    "Continuous batching adds new requests as soon as old ones finish, keeping the accelerator busy. "
    "Once upon a time there was a little model that wanted to learn to write stories about the sea."
)


@pytest.fixture(scope="module")
def capture(tiny_llama_dir):
    return capture_moba(TEXT, CHUNK, TOPK, tiny_llama_dir, layer=1, heads=[0, 2, 3])


def test_selection_is_the_gatings(capture):
    record = capture.record
    assert record.positions.tolist() == list(range(record.q.shape[0]))
    assert record.q.shape[0] > 4 * CHUNK  # enough blocks for a real choice
    gate_keys = moba_gate_keys(record.k, CHUNK)
    expected = select_moba_blocks(record.q, gate_keys, record.positions, CHUNK, TOPK)
    assert torch.equal(record.selected, expected)


def test_block_map_counts_the_selection(capture):
    record, heads = capture.record, capture.heads
    blocks = capture.num_blocks
    expected = torch.full((len(heads), blocks, blocks), float("nan"))
    for j, head in enumerate(heads):
        for query_block in range(blocks):
            rows = range(query_block * CHUNK, min((query_block + 1) * CHUNK, record.q.shape[0]))
            for key_block in range(query_block + 1):
                hits = [
                    key_block == query_block or key_block in record.selected[t, head].tolist() for t in rows
                ]
                expected[j, query_block, key_block] = sum(hits) / len(hits)
    torch.testing.assert_close(capture.block_map(), expected, equal_nan=True)


def test_block_scores_average_the_earlier_blocks_gate_scores(capture):
    scores = capture.block_scores()  # [heads, query blocks, key blocks]
    head, query_block, key_block = capture.heads[1], 3, 1
    rows = slice(query_block * CHUNK, (query_block + 1) * CHUNK)
    expected = capture.record.scores[rows, head, key_block].mean()
    torch.testing.assert_close(scores[1, query_block, key_block], expected)
    assert scores[:, 2, 2:].isnan().all() and not scores[:, 2, :2].isnan().any()


def test_recorded_queries_and_keys_are_the_models(tiny_llama_dir, capture):
    """Layer 0 sees the embeddings whatever the attention: MoBA's q/k there equal the reference backend's."""
    moba = capture_moba(TEXT, CHUNK, TOPK, tiny_llama_dir, layer=0)
    reference = capture_attention(TEXT, tiny_llama_dir, layers=[0]).records[0]
    torch.testing.assert_close(moba.record.q, reference.q)
    torch.testing.assert_close(moba.record.k, reference.k)


def test_cli_draws_a_row_per_head(tiny_llama_dir, tmp_path, check_png):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TEXT)
    png = str(tmp_path / "moba.png")
    args = ["moba", "--prompt-file", str(prompt_file), "--chunk-size", "16", "--topk", "3"]
    assert main([*args, "--model", tiny_llama_dir, "--layer", "1", "--heads", "1,3", "-o", png]) == 0
    check_png(png, 2, 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--chunk-size", "24", "--topk", "3"], "multiple of 16"),
        (["--chunk-size", "16", "--topk", "0"], "topk must be"),
        (["--chunk-size", "16", "--topk", "3", "--layer", "2"], "layer 2 is out of range"),
    ],
)
def test_cli_rejects_bad_requests_with_exit_2(tiny_llama_dir, tmp_path, capsys, options, message):
    args = ["moba", "--prompt", TEXT, "--model", tiny_llama_dir, "-o", str(tmp_path / "m.png"), *options]
    assert main(args) == 2
    assert message in capsys.readouterr().err
