"""LoRA on a GPU: decode steps mixing adapters replay captured CUDA graphs (the one-hot rows are a static
buffer), and every row gives what it gives alone, eagerly. Skipped without a GPU."""

import pytest
import torch
from lora_adapters import write_adapter

from longserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def test_mixed_adapters_replay_graphs_and_equal_eager(tiny_llama_dir, tmp_path):
    adapters = {
        "a": write_adapter(tiny_llama_dir, tmp_path / "a", seed=1),
        "b": write_adapter(tiny_llama_dir, tmp_path / "b", targets=["q_proj", "v_proj"], rank=8, seed=2),
    }
    modules = tuple(f"{k}={v}" for k, v in adapters.items())
    options = dict(device="cuda", kv_cache_memory_mb=16, max_num_seqs=16, lora_modules=modules, max_loras=2,
                   max_lora_rank=8)  # fmt: skip
    graphed = LLM(tiny_llama_dir, **options)
    eager = LLM(tiny_llama_dir, enforce_eager=True, **options)
    graphs = graphed.engine.runner.graphs
    assert graphs is not None
    replays = []
    original = graphs.run
    graphs.run = lambda *a, **k: replays.append(1) or original(*a, **k)
    prompts = [[5 + i, 17, 30 + i, 41] for i in range(6)]
    loras = ["a", None, "b", "a", "b", None]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    ours = graphed.generate(prompts, params, lora=loras)
    theirs = eager.generate(prompts, params, lora=loras)
    assert replays
    for mine, want in zip(ours, theirs, strict=True):
        assert mine.outputs[0].token_ids == want.outputs[0].token_ids
        gap = max(
            abs(x.logprob - y.logprob)
            for x, y in zip(mine.outputs[0].logprobs, want.outputs[0].logprobs, strict=True)
        )
        assert gap < 1e-4
    assert len({tuple(o.outputs[0].token_ids) for o in ours[:3]}) == 3  # adapters change the text
