"""Speculative decoding on a GPU: greedy output equals plain decoding with graphs on, and verification steps
(drafts as decode rows) replay captured graphs. Skipped without a GPU."""

import pytest
import torch

from longserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randint(3, vocab, (7 + i,), generator=g).tolist() * 3) for i in range(6)]


@pytest.mark.parametrize("spec", [NGRAM, "draft"], ids=["ngram", "draft_model"])
def test_greedy_output_equals_plain_with_graphs(tiny_llama_dir, spec):
    spec = (
        spec
        if spec != "draft"
        else {"method": "draft_model", "model": tiny_llama_dir, "draft_kv_cache_memory_mb": 8}
    )
    options = dict(device="cuda", kv_cache_memory_mb=16, max_num_seqs=16)
    plain, speculative = (
        LLM(tiny_llama_dir, **options),
        LLM(tiny_llama_dir, speculative_config=spec, **options),
    )
    graphs = speculative.engine.runner.graphs
    assert graphs is not None
    replays, draft_replays = [], []
    original = graphs.run
    graphs.run = lambda *a, **k: replays.append(a[2].num_decodes) or original(*a, **k)
    if spec.get("method") == "draft_model":  # the draft's catch-up passes (2 rows a sequence) replay too
        draft_graphs = speculative.engine.speculator.proposer.runner.graphs
        draft_original = draft_graphs.run
        draft_graphs.run = lambda *a, **k: draft_replays.append(a[2].num_decodes) or draft_original(*a, **k)
    prompts = _prompts(plain.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [r.outputs[0].token_ids for r in plain.generate(prompts, params)]
    assert [r.outputs[0].token_ids for r in speculative.generate(prompts, params)] == want
    stats = speculative.engine.stats().spec_decode
    assert stats.num_accepted_tokens > 0
    assert max(replays) > len(prompts)  # a verification step (more rows than sequences) replayed a graph
    if spec.get("method") == "draft_model":
        assert max(draft_replays) > len(prompts)


def test_mtp_greedy_output_equals_plain_with_graphs(tmp_path):
    """DeepSeek-V3 with its MTP layer on the GPU: the target's decode graphs hand their hidden states to the
    MTP drafts, and greedy output equals plain decoding."""
    import tiny_models

    directory = tiny_models.write_tiny_mtp_model(tmp_path)[0]
    options = dict(device="cuda", kv_cache_memory_mb=16, max_num_seqs=8)
    plain = LLM(directory, **options)
    speculative = LLM(directory, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **options)
    prompts = _prompts(plain.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [r.outputs[0].token_ids for r in plain.generate(prompts, params)]
    assert [r.outputs[0].token_ids for r in speculative.generate(prompts, params)] == want
    assert speculative.engine.stats().spec_decode.num_drafts > 0
