"""LoRA with the rest of the engine: speculative decoding keeps an adapter's greedy output, grammars still
bind an adapter's output, and on a GGUF base the adapter runs in float beside the low-bit blocks with the
logprobs of the exact (expanded) base."""

import re

import torch
from lora_adapters import write_adapter, write_random_adapter

from longserve import LLM, SamplingParams
from longserve.engine.sampling_params import StructuredOutputParams


def test_speculative_decoding_keeps_an_adapters_greedy_output(tiny_llama_dir, tmp_path):
    modules = (f"a={write_adapter(tiny_llama_dir, tmp_path / 'a', seed=5)}",)
    prompts = [[9, 10, 11, 12] * 4, [30, 31, 32] * 5]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(tiny_llama_dir, lora_modules=modules)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    speculative = LLM(tiny_llama_dir, lora_modules=modules, speculative_config=spec)
    for lora in ("a", None):
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, lora=lora)]
        assert [o.outputs[0].token_ids for o in speculative.generate(prompts, params, lora=lora)] == want
    assert speculative.engine.stats().spec_decode.num_drafts > 0


def test_a_grammar_binds_an_adapters_output(tiny_llama_dir, tmp_path):
    modules = (f"a={write_adapter(tiny_llama_dir, tmp_path / 'a', seed=6)}",)
    llm = LLM(tiny_llama_dir, lora_modules=modules)
    regex = r"(cat|dog)-[0-9]{3}"
    params = SamplingParams(
        temperature=0.8, seed=3, max_tokens=20, structured_output=StructuredOutputParams(regex=regex)
    )
    for out in llm.generate(["Name a pet:"] * 4, params, lora=["a", None, "a", "a"]):
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text


def test_an_adapter_on_a_gguf_base_matches_the_exact_base(tmp_path):
    from longserve.loading.default_model import default_model_path

    model = str(default_model_path())
    # An fp32 cache (auto is fp16 with blocks): the gap measured is the low-bit matmuls' alone.
    blocks = LLM(model, enable_lora=True, max_lora_rank=8, kv_cache_memory_mb=64, kv_cache_dtype="float32")
    config = blocks.engine.model_config
    adapter = write_random_adapter(config, tmp_path / "a", rank=8, seed=0)
    blocks.engine.add_lora("a", adapter)
    exact = LLM(
        model, quantization="none", lora_modules=(f"a={adapter}",), max_lora_rank=8, kv_cache_memory_mb=64
    )
    assert blocks.engine.quantization == "gguf" and exact.engine.quantization is None
    prompt = blocks.tokenizer.encode("The capital of France is a city called")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)

    def logprobs(llm, lora):
        out = llm.generate([prompt], params, lora=lora)[0]
        return torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])

    with_adapter = logprobs(blocks, "a")
    torch.testing.assert_close(with_adapter, logprobs(exact, "a"), rtol=0, atol=2e-3)
    assert (with_adapter - logprobs(blocks, None)).abs().max() > 1e-2  # the adapter moves them
