"""DeepSeek-V2/V3 (MLA + DeepSeekMoE): our logits equal HF transformers' on tiny random checkpoints.

Whole prompt in one pass, and uneven prompt chunks then step-by-step decoding through the paged KV cache, on
both attention backends; guards that YaRN, group routing and the correction bias really change the result;
the transformers-5 stacked-expert layout; serving through the engine; bad configs named.
"""

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from paged_runner import PagedRunner, chunked_then_stepwise_logits, hf_logits_cache, whole_prompt_logits
from tiny_models import TOKENIZER_FILES, load_hf_model

from longserve import LLM, SamplingParams
from longserve.attention.backend import get_backend
from longserve.layers.mlp import SwiGLUMLP
from longserve.layers.moe import MoE, route
from longserve.loading.errors import ModelLoadError
from longserve.models.deepseek import DeepseekConfig
from longserve.models.registry import build_model

ARCHITECTURES = ["deepseek_v2", "deepseek_v3"]
TOL = dict(rtol=1e-4, atol=1e-4)


def _with_correction_bias(src: str, dst: Path) -> str:
    """``src`` re-saved with a random e_score_correction_bias (a buffer: the tiny builder leaves it zero)."""
    model = load_hf_model(src)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Large enough to change which experts win (see test_correction_bias_changes_the_logits).
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    model.save_pretrained(dst)
    for file in ("config.json", *TOKENIZER_FILES):
        shutil.copyfile(Path(src) / file, dst / file)
    return str(dst)


@pytest.fixture(scope="module")
def model_dir(tiny_model_cache, tmp_path_factory):
    dirs = {"deepseek_v2": tiny_model_cache.path("deepseek_v2")}
    dirs["deepseek_v3"] = _with_correction_bias(
        tiny_model_cache.path("deepseek_v3"), tmp_path_factory.mktemp("deepseek_v3_bias")
    )
    return dirs


@pytest.fixture(scope="module")
def hf_logits(model_dir):
    return hf_logits_cache(model_dir.__getitem__, prompt_length=80)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_prompt_logits_match_hf(arch, backend, model_dir, hf_logits):
    prompt, expected = hf_logits(arch)
    torch.testing.assert_close(whole_prompt_logits(model_dir[arch], backend, prompt), expected, **TOL)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_then_step_by_step_decode_matches_hf(arch, backend, model_dir, hf_logits):
    prompt, expected = hf_logits(arch)
    ours = chunked_then_stepwise_logits(model_dir[arch], backend, prompt)
    torch.testing.assert_close(ours, expected, **TOL)


def test_layers_are_dense_then_moe_with_shared_experts(model_dir):
    for arch in ARCHITECTURES:
        model = PagedRunner(model_dir[arch], "dense").model
        assert isinstance(model.layers[0].mlp, SwiGLUMLP)  # first_k_dense_replace=1
        assert all(isinstance(layer.mlp, MoE) for layer in model.layers[1:])
        assert all(layer.mlp.shared_experts is not None for layer in model.layers[1:])
    v2 = DeepseekConfig.from_hf(json.load(open(Path(model_dir["deepseek_v2"]) / "config.json")))
    assert (v2.num_kv_heads, v2.head_dim) == (4, 24)  # the cache holds every head's [k_nope | k_pe]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_test_prompt_reaches_every_expert(arch, model_dir, hf_logits):
    """Guard: a logits match is only evidence for experts the prompt actually routes tokens to."""
    prompt, _ = hf_logits(arch)
    runner = PagedRunner(model_dir[arch], "dense")
    used: list[set[int]] = []

    def record(moe, module, inputs, logits):
        used.append(set(route(logits, moe.router, moe.e_score_correction_bias)[1].flatten().tolist()))

    for layer in runner.model.layers[1:]:
        layer.mlp.gate.register_forward_hook(partial(record, layer.mlp))
    runner.feed(prompt)
    assert len(used) == 2 and all(ids == set(range(8)) for ids in used)


def _copy_with_config(src: str, dst: Path, **changes) -> str:
    shutil.copytree(src, dst)
    path = dst / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize(
    "arch, changes",
    [
        ("deepseek_v2", dict(rope_scaling=None)),  # YaRN frequencies and softmax mscale
        ("deepseek_v2", dict(topk_method="greedy")),  # group-limited routing
        ("deepseek_v3", dict(n_group=1, topk_group=1)),  # group-limited routing
    ],
)
def test_the_features_under_test_change_the_logits(arch, changes, model_dir, hf_logits, tmp_path):
    """Guard against a match that holds because a feature never bites on this prompt."""
    prompt, expected = hf_logits(arch)
    changed = PagedRunner(_copy_with_config(model_dir[arch], tmp_path / "m", **changes), "dense")
    assert (changed.feed(prompt) - expected).abs().max() > 1e-2


def test_correction_bias_changes_the_logits(model_dir, hf_logits):
    prompt, expected = hf_logits("deepseek_v3")
    runner = PagedRunner(model_dir["deepseek_v3"], "dense")
    for layer in runner.model.layers[1:]:
        layer.mlp.e_score_correction_bias.zero_()
    assert (runner.feed(prompt) - expected).abs().max() > 1e-2


def test_stacked_expert_weights_and_mtp_layers_load(model_dir, hf_logits):
    """transformers 5's in-memory names (experts.gate_up_proj, down_proj) load too; MTP layers are skipped."""
    prompt, expected = hf_logits("deepseek_v3")
    state = load_hf_model(model_dir["deepseek_v3"]).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # a multi-token-prediction layer
    runner = PagedRunner(model_dir["deepseek_v3"], "dense")
    config = json.loads((Path(model_dir["deepseek_v3"]) / "config.json").read_text())
    runner.model, _ = build_model(config, get_backend("dense"), torch.float32)  # fresh, unloaded
    runner.model.load_weights(state)
    runner.model.prepare_for_inference()
    torch.testing.assert_close(runner.feed(prompt), expected, **TOL)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_equals_single_greedy_through_the_engine(arch, model_dir):
    llm = LLM(model_dir[arch], kv_cache_memory_mb=4)
    generator = torch.Generator().manual_seed(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in (3, 9, 17, 30, 6)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        assert llm.generate([prompt], params)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert (
        len(llm.generate("Hello", SamplingParams(max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids) == 5
    )


@pytest.mark.parametrize(
    "arch, changes, field",
    [
        ("deepseek_v2", dict(scoring_func="tanh"), "scoring_func"),
        ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
        ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
        ("deepseek_v3", dict(topk_method="best"), "topk_method"),
        ("deepseek_v2", dict(num_experts_per_tok=9), "num_experts_per_tok"),
        ("deepseek_v3", dict(n_routed_experts=0), "n_routed_experts"),
        ("deepseek_v3", dict(n_group=3), "n_group"),
        ("deepseek_v2", dict(topk_group=3), "topk_group"),
        ("deepseek_v3", dict(num_experts_per_tok=5), "num_experts_per_tok"),  # > 1 group of 4
        ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
        ("deepseek_v2", dict(kv_lora_rank=None), "kv_lora_rank"),
        ("deepseek_v3", dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq"),
        # The checkpoint has 8 experts per layer, the config says 4: the leftover tensors are named.
        ("deepseek_v3", dict(n_routed_experts=4, n_group=1), r"experts\.4\."),
    ],
)
def test_bad_configs_name_the_field(arch, changes, field, model_dir, tmp_path):
    directory = _copy_with_config(model_dir[arch], tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError, match=field):
        LLM(directory, kv_cache_memory_mb=4)
