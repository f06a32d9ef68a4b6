"""Every supported architecture: our logits equal HF transformers' on the same tiny random checkpoint (fp32).

Checked for a whole prompt in one pass, and for step-by-step decoding (plus uneven prompt chunks) through the
paged KV cache with scattered block tables, on both attention backends.
"""

import pytest
import torch
from paged_runner import PagedRunner, chunked_then_stepwise_logits, hf_logits_cache, whole_prompt_logits

ARCHITECTURES = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def hf_logits(tiny_model_dirs):
    return hf_logits_cache(tiny_model_dirs.__getitem__, prompt_length=37)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_prompt_logits_match_hf(arch, backend, tiny_model_dirs, hf_logits):
    prompt, expected = hf_logits(arch)
    torch.testing.assert_close(whole_prompt_logits(tiny_model_dirs[arch], backend, prompt), expected, **TOL)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_then_step_by_step_decode_matches_hf(arch, backend, tiny_model_dirs, hf_logits):
    prompt, expected = hf_logits(arch)
    ours = chunked_then_stepwise_logits(tiny_model_dirs[arch], backend, prompt)
    torch.testing.assert_close(ours, expected, **TOL)


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
