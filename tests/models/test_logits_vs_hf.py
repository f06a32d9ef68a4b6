"""Every supported architecture: our logits equal HF transformers' on the same tiny random checkpoint (fp32).

Checked for a whole prompt in one pass, and for step-by-step decoding (plus uneven prompt chunks) through the
paged KV cache with scattered block tables, on both attention backends.
"""

import pytest
import torch
from paged_runner import PagedRunner
from tiny_models import load_hf_model

ARCHITECTURES = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]
TOL = dict(rtol=1e-4, atol=1e-4)


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
