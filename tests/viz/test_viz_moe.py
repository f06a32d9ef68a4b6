"""``longserve viz moe``: expert loads and per-token routing from the MoE blocks' recording hook."""

from __future__ import annotations

import pytest
import torch

from longserve.layers.moe import MoE, RouterConfig
from longserve.viz import capture_moe_routing
from longserve.viz.cli import main

PROMPT = "The quick brown fox jumps over the lazy dog. Hello, world!"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_counts_sum_to_tokens_times_top_k(tiny_model_cache, arch):
    capture = capture_moe_routing(PROMPT, tiny_model_cache.path(arch))
    counts = capture.counts()  # [MoE layers, experts]
    tokens = len(capture.token_ids)
    assert counts.shape == (len(capture.moe_layers), capture.num_experts)
    assert counts.sum(dim=1).tolist() == [tokens * capture.top_k] * len(capture.moe_layers)
    routing = capture.routing_map()  # [tokens, experts]
    assert ((routing > 0).sum(dim=1) == capture.top_k).all()
    first = capture.records[capture.layer]
    assert torch.equal(routing.gather(1, first.ids), first.weights)


def test_only_moe_layers_are_recorded(tiny_qwen2_moe_dir):
    capture = capture_moe_routing(PROMPT, tiny_qwen2_moe_dir, layer=2)
    assert capture.moe_layers == [0, 2]  # layer 1 is dense (mlp_only_layers)
    assert capture.layer == 2


def test_the_hook_is_off_by_default():
    assert MoE(8, 16, RouterConfig(4, 2)).record is None


def test_cli_draws_load_and_routing(tiny_mixtral_dir, tmp_path, check_png, capsys):
    png = str(tmp_path / "moe.png")
    assert main(["moe", "--model", tiny_mixtral_dir, "--prompt", PROMPT, "-o", png]) == 0
    assert capsys.readouterr().out.strip() == png
    check_png(png, 1, 2)


def test_cli_rejects_a_model_without_moe_layers(tiny_llama_dir, tmp_path, capsys):
    assert main(["moe", "--model", tiny_llama_dir, "--prompt", PROMPT, "-o", str(tmp_path / "m.png")]) == 2
    assert "no MoE layers" in capsys.readouterr().err


def test_cli_rejects_a_dense_layer(tiny_qwen2_moe_dir, tmp_path, capsys):
    args = ["moe", "--model", tiny_qwen2_moe_dir, "--prompt", PROMPT, "--layer", "1"]
    assert main([*args, "-o", str(tmp_path / "m.png")]) == 2
    assert "not an MoE layer" in capsys.readouterr().err
