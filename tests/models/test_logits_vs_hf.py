"""Every supported architecture: our logits equal HF transformers' on the same tiny random checkpoint (fp32).

Checked for a whole prompt in one pass, and for step-by-step decoding (plus uneven prompt chunks) through the
paged KV cache with scattered block tables, on both attention backends.
"""

import pytest
import torch
from tiny_models import load_hf_model

from longserve.attention.backend import get_backend
from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.loading.checkpoint import load_checkpoint
from longserve.models.registry import build_model

ARCHITECTURES = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]
BLOCK = 4
TOL = dict(rtol=1e-4, atol=1e-4)


class PagedRunner:
    """Drives our model over one sequence, chunk by chunk, through a paged cache with shuffled blocks."""

    def __init__(self, directory: str, backend: str) -> None:
        checkpoint = load_checkpoint(directory)
        self.model, config = build_model(checkpoint.config, get_backend(backend), torch.float32)
        self.model.load_weights(checkpoint.weights)
        self.model.prepare_for_inference()
        num_blocks = 64
        self.caches = allocate_kv_cache(
            config.num_layers, num_blocks, BLOCK, config.num_kv_heads, config.head_dim, torch.float32
        )
        generator = torch.Generator().manual_seed(0)
        self.block_table = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
        self.computed = 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> torch.Tensor:
        n = len(token_ids)
        metadata = build_attention_metadata([self.block_table], [self.computed], [n], BLOCK)
        positions = torch.arange(self.computed, self.computed + n)
        hidden = self.model(torch.tensor(token_ids), positions, self.caches, metadata)
        self.computed += n
        return self.model.compute_logits(hidden)  # [n, vocab]


def _prompt(vocab_size: int, length: int = 37) -> list[int]:
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def hf_logits(tiny_model_dirs):
    cache = {}

    def get(arch: str) -> tuple[list[int], torch.Tensor]:
        if arch not in cache:
            model = load_hf_model(tiny_model_dirs[arch])
            prompt = _prompt(model.config.vocab_size)
            with torch.no_grad():
                cache[arch] = prompt, model(torch.tensor([prompt])).logits[0].float()
        return cache[arch]

    return get


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_prompt_logits_match_hf(arch, backend, tiny_model_dirs, hf_logits):
    prompt, expected = hf_logits(arch)
    ours = PagedRunner(tiny_model_dirs[arch], backend).feed(prompt)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_then_step_by_step_decode_matches_hf(arch, backend, tiny_model_dirs, hf_logits):
    prompt, expected = hf_logits(arch)
    runner = PagedRunner(tiny_model_dirs[arch], backend)
    rows = [runner.feed(prompt[:5]), runner.feed(prompt[5:11])]  # uneven chunks crossing block boundaries
    rows += [runner.feed([token]) for token in prompt[11:]]  # one token at a time: the paged decode path
    torch.testing.assert_close(torch.cat(rows), expected, **TOL)


def test_llama3_rope_scaling_changes_the_logits(tiny_model_dirs, hf_logits):
    """Guard against a rope-scaling test that passes because the scaling never bites."""
    prompt, expected = hf_logits("llama3_rope")
    import json
    import os
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(tiny_model_dirs["llama3_rope"]):
            shutil.copy(os.path.join(tiny_model_dirs["llama3_rope"], name), tmp)
        config_path = os.path.join(tmp, "config.json")
        config = json.load(open(config_path))
        config["rope_scaling"] = None
        json.dump(config, open(config_path, "w"))
        unscaled = PagedRunner(tmp, "dense").feed(prompt)
    assert (unscaled - expected).abs().max() > 1e-2
