"""A CPU decode step's layers as one compiled call each (``layers/cpu_decoder_layer``) give exactly what the
modules give: the same tokens and the same logprobs, bit for bit, batched, with either activation width and
either cache type."""

from __future__ import annotations

import pytest

from longserve import LLM, SamplingParams
from longserve.layers.cpu_decoder_layer import CpuDecodeLayer

PROMPTS = ["Tell me about the sea.", "1, 2, 3, 4,", "def fib(n):" * 6]


@pytest.mark.parametrize(
    ("quantization", "kv_cache_dtype"),
    [("gguf", "auto"), ("gguf-q8", "float32")],
    ids=["default", "q8-fp32-cache"],
)
def test_compiled_layers_equal_the_modules(monkeypatch, quantization, kv_cache_dtype) -> None:
    llm = LLM(quantization=quantization, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64)
    layers = llm.engine.model.layers
    assert all(layer.cpu_step is not None for layer in layers)
    calls = []
    run = CpuDecodeLayer.__call__
    monkeypatch.setattr(CpuDecodeLayer, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    # 64-token steps: the long prompt is prefilled in chunks while the others decode (mixed steps: modules).
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    compiled = llm.generate(PROMPTS, params)
    assert len(calls) >= 20 * len(layers)  # most steps were decode-only
    for layer in layers:
        layer.cpu_step = None
    modules = llm.generate(PROMPTS, params)
    for ours, theirs in zip(compiled, modules, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert ours.outputs[0].logprobs == theirs.outputs[0].logprobs


def test_compiled_layers_add_each_rows_lora_update_as_the_modules_do(tmp_path) -> None:
    """Rows of two adapters and of none in one decode step: the compiled layers run each row's update with
    the modules' own kernel, so adapters change the text and the result equals the modules' bit for bit."""
    from lora_adapters import write_random_adapter

    base = LLM(max_num_seqs=8)
    adapters = [
        f"ad{i}={write_random_adapter(base.engine.model_config, tmp_path / f'ad{i}', 8, i)}" for i in (0, 1)
    ]
    llm = LLM(lora_modules=tuple(adapters), max_loras=2, max_num_batched_tokens=128)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    loras = ["ad0", None, "ad1"]
    compiled = llm.generate(PROMPTS, params, lora=loras)
    assert all(layer.cpu_step.lora_rows is not None for layer in llm.engine.model.layers)
    for layer in llm.engine.model.layers:
        layer.cpu_step = None
    modules = llm.generate(PROMPTS, params, lora=loras)
    for ours, theirs in zip(compiled, modules, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert ours.outputs[0].logprobs == theirs.outputs[0].logprobs
    plain = base.generate(PROMPTS, params)
    assert plain[1].outputs[0].token_ids == compiled[1].outputs[0].token_ids  # no adapter: the base model
    assert plain[0].outputs[0].logprobs != compiled[0].outputs[0].logprobs  # an adapter moves its row


def test_exact_mode_keeps_the_modules() -> None:
    llm = LLM(quantization="none")
    assert all(layer.cpu_step is None for layer in llm.engine.model.layers)
