"""MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE): our logits equal HF transformers' on tiny random checkpoints.

Whole prompt in one pass, and uneven prompt chunks then step-by-step decoding through the paged KV cache, on
both attention backends; then the models serve through the engine, and bad expert configs are reported.
"""

import json
import os
import shutil
from functools import partial

import pytest
import torch
from paged_runner import PagedRunner, hf_logits_cache, whole_prompt_logits

from longserve import LLM, SamplingParams
from longserve.layers.mlp import SwiGLUMLP
from longserve.layers.moe import MoE, route
from longserve.loading.errors import ModelLoadError

ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe"]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def moe_dir(tiny_model_cache):
    return tiny_model_cache.path


@pytest.fixture(scope="module")
def hf_logits(moe_dir):
    return hf_logits_cache(moe_dir, prompt_length=37)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_prompt_logits_match_hf(arch, backend, moe_dir, hf_logits):
    prompt, expected = hf_logits(arch)
    torch.testing.assert_close(whole_prompt_logits(moe_dir(arch), backend, prompt), expected, **TOL)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_then_step_by_step_decode_matches_hf(arch, backend, moe_dir, hf_logits):
    prompt, expected = hf_logits(arch)
    runner = PagedRunner(moe_dir(arch), backend)
    rows = [runner.feed(prompt[:5]), runner.feed(prompt[5:11])]  # uneven chunks crossing block boundaries
    rows += [runner.feed([token]) for token in prompt[11:]]  # one token at a time: batches of one token
    torch.testing.assert_close(torch.cat(rows), expected, **TOL)


def test_layers_follow_the_configs_sparse_and_dense_choice(moe_dir):
    kinds = {}
    for arch in ARCHITECTURES:
        model = PagedRunner(moe_dir(arch), "dense").model
        kinds[arch] = ["moe" if isinstance(layer.mlp, MoE) else "dense" for layer in model.layers]
        assert all(isinstance(layer.mlp, MoE | SwiGLUMLP) for layer in model.layers)
    assert kinds == {
        "mixtral": ["moe", "moe"],
        "qwen2_moe": ["moe", "dense", "moe"],  # mlp_only_layers=[1]
        "qwen3_moe": ["dense", "moe"],  # decoder_sparse_step=2
    }
    qwen2 = PagedRunner(moe_dir("qwen2_moe"), "dense").model.layers[0].mlp
    assert qwen2.shared_experts is not None and qwen2.shared_expert_gate is not None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_test_prompt_reaches_every_expert(arch, moe_dir, hf_logits):
    """Guard: a logits match is only evidence for experts the prompt actually routes tokens to."""
    prompt, _ = hf_logits(arch)
    runner = PagedRunner(moe_dir(arch), "dense")
    used: list[set[int]] = []

    def record(router, module, inputs, logits):
        used.append(set(route(logits, router)[1].flatten().tolist()))

    for layer in runner.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.gate.register_forward_hook(partial(record, layer.mlp.router))
    runner.feed(prompt)
    num_experts = runner.model.config.num_experts
    assert used and all(ids == set(range(num_experts)) for ids in used)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_equals_single_greedy_through_the_engine(arch, moe_dir):
    llm = LLM(moe_dir(arch), kv_cache_memory_mb=4)
    generator = torch.Generator().manual_seed(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [
        torch.randint(3, vocab, (int(n),), generator=generator).tolist() for n in (3, 9, 17, 30, 41, 6)
    ]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        assert llm.generate([prompt], params)[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_text_generation_runs_end_to_end(moe_dir):
    out = LLM(moe_dir("mixtral"), kv_cache_memory_mb=4).generate("Hello", SamplingParams(max_tokens=5))
    assert len(out[0].outputs[0].token_ids) == 5


# ---- bad configs ---------------------------------------------------------------------------------------


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return str(dst)


@pytest.mark.parametrize(
    "arch, changes, field",
    [
        ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok"),
        ("mixtral", dict(num_local_experts=0), "num_local_experts"),
        ("mixtral", dict(num_local_experts=None), "num_local_experts"),
        ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
        ("qwen2_moe", dict(num_experts_per_tok=9), "num_experts_per_tok"),
        ("qwen2_moe", dict(mlp_only_layers=[7]), "mlp_only_layers"),
        ("qwen2_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
        ("qwen2_moe", dict(shared_expert_intermediate_size=None), "shared_expert_intermediate_size"),
        ("qwen3_moe", dict(moe_intermediate_size=-4), "moe_intermediate_size"),
        # The checkpoint has 8 experts per layer, the config says 6: the leftover tensors are named.
        ("qwen3_moe", dict(num_local_experts=6), r"experts\.6\."),
    ],
)
def test_inconsistent_expert_configs_name_the_field(arch, changes, field, moe_dir, tmp_path):
    model_dir = _copy_with_config(moe_dir(arch), tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError, match=field):
        LLM(model_dir)
