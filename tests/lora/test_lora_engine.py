"""LoRA through the engine as a user drives it (``LLM(lora_modules=...)``): logits equal HF PEFT's, a batch
mixing adapters and the base gives each row what it gives alone, the prefix cache keeps adapters apart, and
adapters come and go at run time without disturbing running requests."""

from __future__ import annotations

import pytest
import torch
from lora_adapters import write_adapter
from paged_runner import random_prompt
from tiny_models import build_hf_model, write_tokenizer

from longserve import LLM, SamplingParams
from longserve.engine.protocol import EngineRequest
from longserve.lora.adapter import LoRAError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _prompt_logprobs(llm: LLM, prompt: list[int], lora: str | None) -> torch.Tensor:
    """Each prompt token's logprob (after the first), as the engine computes it with ``lora``."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    out = llm.generate([prompt], params, lora=lora)[0]
    return torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]], dtype=torch.float64)


def _peft_prompt_logprobs(base_dir: str, adapter_dir: str, prompt: list[int]) -> torch.Tensor:
    from lora_adapters import peft_logits

    logprobs = torch.log_softmax(peft_logits(base_dir, adapter_dir, prompt).double(), dim=-1)
    return logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize(
    "arch, targets, rslora",
    [
        ("llama", None, False),  # every projection
        ("llama", ["q_proj", "v_proj"], True),  # a subset, rsLoRA scaling
        ("qwen2", None, False),  # q/k/v with biases
        ("qwen3", ATTENTION + ["down_proj"], False),
        ("mistral", ["k_proj", "gate_proj", "up_proj"], False),
        ("mixtral", ATTENTION, False),  # an MoE family's attention
        ("qwen2_moe", None, False),  # attention, the dense layer and the shared expert
    ],
)
def test_logits_with_an_adapter_equal_peft(arch, targets, rslora, tiny_model_dirs, tmp_path):
    base = tiny_model_dirs[arch]
    adapter = write_adapter(base, tmp_path / "adapter", targets=targets, rslora=rslora)
    llm = LLM(base, lora_modules=(f"tuned={adapter}",), max_lora_rank=8)
    prompt = random_prompt(llm.engine.model_config.vocab_size, 23)
    expected = _peft_prompt_logprobs(base, adapter, prompt)
    ours = _prompt_logprobs(llm, prompt, "tuned")
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    base_logprobs = _prompt_logprobs(llm, prompt, None)
    assert (base_logprobs - expected).abs().max() > 1e-2, "the adapter does not move the logits"


@pytest.fixture(scope="module")
def three_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_adapter(tiny_llama_dir, root / "a", seed=1),
        "b": write_adapter(tiny_llama_dir, root / "b", targets=ATTENTION, rank=8, seed=2),
        "c": write_adapter(tiny_llama_dir, root / "c", targets=["gate_proj", "down_proj"], rank=2, seed=3),
    }


def _modules(adapters: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"{name}={path}" for name, path in adapters.items())


@pytest.mark.parametrize("max_loras", [3, 2])  # 2: a row waits for a slot held by running sequences
def test_a_batch_mixing_adapters_gives_each_row_what_it_gives_alone(
    tiny_llama_dir, three_adapters, max_loras
):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    prompts = [[5 + i, 17, 30 + 2 * i, 41, 9] for i in range(8)]
    loras = ["a", "b", None, "c", "a", None, "c", "b"]
    llm = LLM(tiny_llama_dir, lora_modules=_modules(three_adapters), max_loras=max_loras, max_lora_rank=8,
              max_cpu_loras=3)  # fmt: skip
    mixed = llm.generate(prompts, params, lora=loras)
    alone_llm = LLM(tiny_llama_dir, lora_modules=_modules(three_adapters), max_lora_rank=8, max_loras=1)
    for prompt, lora, out in zip(prompts, loras, mixed, strict=True):
        alone = alone_llm.generate([prompt], params, lora=lora)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, lora
        ours = [entry.logprob for entry in out.outputs[0].logprobs]
        theirs = [entry.logprob for entry in alone.outputs[0].logprobs]
        assert max(abs(x - y) for x, y in zip(ours, theirs, strict=True)) <= 1e-5
    # Different adapters do give different text: the mix is not the base model four times over.
    texts = {tuple(out.outputs[0].token_ids) for out in mixed[:4]}
    assert len(texts) == 4


def test_the_prefix_cache_never_serves_one_adapters_kv_to_another(tiny_llama_dir, three_adapters):
    prompt = list(range(40, 90)) + [7, 8]  # three full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    llm = LLM(tiny_llama_dir, lora_modules=_modules(three_adapters), max_loras=2, max_lora_rank=8)
    first = llm.generate([prompt], params, lora="a")[0]
    again = llm.generate([prompt], params, lora="a")[0]
    other = llm.generate([prompt], params, lora="b")[0]
    base = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    fresh = LLM(tiny_llama_dir, lora_modules=_modules(three_adapters), max_lora_rank=8)
    assert fresh.generate([prompt], params, lora="b")[0].outputs[0].token_ids == other.outputs[0].token_ids


def test_adapters_load_and_unload_at_run_time_while_requests_run(tiny_llama_dir, three_adapters):
    llm = LLM(tiny_llama_dir, enable_lora=True, max_lora_rank=8)
    engine = llm.engine
    assert engine.lora_names == []
    engine.add_lora("a", three_adapters["a"])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params, lora="a")[0].outputs[0].token_ids
    # A request running on "a" keeps running on it after "a" is unloaded; new requests are refused.
    engine.add_request(EngineRequest("running", [5, 6, 7], params, "a"))
    tokens: list[int] = []
    for delta in engine.step():
        tokens += delta.seqs[0].token_ids
    stats = engine.stats()
    assert (stats.running_loras, stats.waiting_loras, stats.max_loras) == (["a"], [], 1)
    engine.remove_lora("a")
    with pytest.raises(ValueError, match="not loaded"):
        llm.generate([[5, 6, 7]], params, lora="a")
    while engine.has_unfinished():
        for delta in engine.step():
            tokens += delta.seqs[0].token_ids
    assert tokens == expected
    assert engine.lora.device_slots[0].users == 0 and not engine.lora.held
    # Reloaded under the same name, it serves again (as a new adapter: its own prefix-cache keys).
    engine.add_lora("a", three_adapters["a"])
    assert llm.generate([[5, 6, 7]], params, lora="a")[0].outputs[0].token_ids == expected
    with pytest.raises(LoRAError, match="already loaded"):
        engine.add_lora("a", three_adapters["b"])


def test_bad_adapters_are_refused_with_the_reason(tiny_llama_dir, tmp_path):
    llm = LLM(tiny_llama_dir, enable_lora=True, max_lora_rank=4)
    engine = llm.engine
    with pytest.raises(LoRAError, match="is not a directory"):
        engine.add_lora("x", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="adapter_config.json is missing"):
        engine.add_lora("x", str(tmp_path / "empty"))
    with pytest.raises(LoRAError, match="rank 8 .* exceeds max_lora_rank"):
        engine.add_lora("x", write_adapter(tiny_llama_dir, tmp_path / "r8", rank=8))
    with pytest.raises(LoRAError, match="DoRA"):
        engine.add_lora("x", write_adapter(tiny_llama_dir, tmp_path / "dora", use_dora=True))
    # An adapter trained on another base (a wider MLP) does not fit this one.
    wider = build_hf_model("llama", intermediate_size=engine.model_config.intermediate_size + 32)
    wider.save_pretrained(tmp_path / "wider")
    write_tokenizer(tmp_path / "wider")
    other = write_adapter(str(tmp_path / "wider"), tmp_path / "other", targets=["gate_proj"])
    with pytest.raises(LoRAError, match="does not fit this base model: .*gate_proj"):
        engine.add_lora("x", other)
    assert engine.lora_names == []
    params = SamplingParams(temperature=0, max_tokens=4)
    assert len(llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids) == 4  # still serving
