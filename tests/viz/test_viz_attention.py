"""``longserve viz attention``: the captured weights are the reference backend's (and HF's), and it draws them."""

from __future__ import annotations

import pytest
import torch

from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.attention.recording import AttentionRecord
from longserve.attention.reference import ReferenceAttention
from longserve.viz import capture_attention
from longserve.viz.cli import main

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def capture(tiny_llama_dir):
    return capture_attention(PROMPT, tiny_llama_dir, layers=[0, 1], heads=[0, 1, 3])


def test_rows_sum_to_one_and_future_keys_get_nothing(capture):
    weights = capture.weights  # [layers, heads, queries, keys]
    n = len(capture.tokens)
    assert weights.shape == (2, 3, n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, n))
    assert (weights.triu(diagonal=1) == 0).all()


def test_weights_are_softmax_of_the_recorded_queries_and_keys(capture):
    for i, layer in enumerate(capture.layers):
        record = capture.records[layer]
        q, k = record.q, record.k  # [tokens, heads, d], [tokens, kv_heads, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        future = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(diagonal=1)
        expected = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # [heads, queries, keys]
        torch.testing.assert_close(capture.weights[i], expected[capture.heads])


def test_weights_match_transformers_eager_attention(capture, tiny_llama_dir):
    from tiny_models import load_hf_model

    model = load_hf_model(tiny_llama_dir)
    model.config._attn_implementation = "eager"  # the path that returns attention probabilities
    with torch.no_grad():
        out = model(torch.tensor([capture.token_ids]), output_attentions=True)
    for i, layer in enumerate(capture.layers):
        expected = out.attentions[layer][0, capture.heads]  # [heads, queries, keys]
        torch.testing.assert_close(capture.weights[i], expected, atol=1e-5, rtol=1e-4)


def test_the_hook_is_off_by_default_and_changes_nothing():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    metadata = build_attention_metadata([[1, 2]], [0], [7], 4)
    plain = ReferenceAttention()
    assert plain.record is None
    records: list[AttentionRecord] = []
    recorded = ReferenceAttention(records.append)
    outs = [
        backend.forward(q, k, v, allocate_kv_cache(1, 3, 4, 2, 8, torch.float32)[0], metadata, 0.3)
        for backend in (plain, recorded)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    (record,) = records
    assert record.query_start == 0 and record.weights.shape == (4, 7, 7) and record.scale == 0.3


def test_cli_writes_a_png_grid_and_an_svg(tiny_llama_dir, tmp_path, check_png, capsys):
    png = str(tmp_path / "attention.png")
    args = ["attention", "--prompt", PROMPT, "--model", tiny_llama_dir, "--layers", "0,1", "--heads", "0,1,2"]
    assert main([*args, "-o", png]) == 0
    assert capsys.readouterr().out.strip() == png
    check_png(png, 2, 3)
    svg = tmp_path / "sub" / "attention.svg"
    assert main([*args, "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--layers", "0,2", "layer 2 is out of range"),
        ("--heads", "4", "head 4 is out of range"),
        ("-o", "out.jpg", "must end in .png or .svg"),
    ],
)
def test_cli_rejects_bad_requests_with_exit_2(tiny_llama_dir, tmp_path, capsys, option, value, message):
    args = ["attention", "--prompt", PROMPT, "--model", tiny_llama_dir, "-o", str(tmp_path / "a.png")]
    assert main([*args, option, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_cli_rejects_a_malformed_index_list(capsys):
    assert main(["attention", "--prompt", "x", "--layers", "0,a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_default_gguf_model(tmp_path, check_png):
    """The default model (SmolLM2-135M-Instruct Q4_1), when no --model is given."""
    png = str(tmp_path / "default.png")
    assert main(["attention", "--prompt", "Paris is the capital of", "--layers", "0,29", "-o", png]) == 0
    check_png(png, 2, 4)  # the first four of its nine heads
