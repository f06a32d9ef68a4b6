"""MTP drafts (``method: mtp``): a tiny DeepSeek-V3 checkpoint carrying a multi-token-prediction layer. The drafts
are the MTP layer's greedy predictions (its logits against an oracle built from HF's own DeepSeek-V3 decoder
layer), and speculative output equals plain decoding."""

from pathlib import Path

import pytest
import tiny_models
import torch
import transformers

from longserve import LLM, SamplingParams

LAYERS = tiny_models.TINY_SPECS["deepseek_v3"].config_kwargs["num_hidden_layers"]
MTP = tiny_models.MTP_PREFIX


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    return tiny_models.write_tiny_mtp_model(tmp_path_factory.mktemp("tiny_mtp"))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _oracle(mtp_model):
    """tokens t_0 .. t_{n-1} -> the MTP layer's logits for t_n (row n - 2): the target's final hidden states
    from HF's first LAYERS layers; the MTP block as a one-layer HF DeepSeek-V3 fed ``inputs_embeds``."""
    _, full, weights = mtp_model
    config = full.config
    target = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**{**config.to_dict(), "num_hidden_layers": LAYERS})
    ).eval()
    target.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(MTP)})
    block = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **{**config.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0}
        )
    ).eval()
    state = {k.replace(MTP, "model.layers.0."): v for k, v in full.state_dict().items() if k.startswith(MTP)}
    state.update({
        "model.embed_tokens.weight": weights[MTP + "embed_tokens.weight"],
        "model.norm.weight": weights[MTP + "shared_head.norm.weight"],
        "lm_head.weight": weights[MTP + "shared_head.head.weight"],
    })  # fmt: skip
    block.load_state_dict(state)
    eps = config.rms_norm_eps

    @torch.no_grad()
    def logits(tokens: list[int]) -> torch.Tensor:
        h = target.model(torch.tensor([tokens[:-1]])).last_hidden_state[0]  # [n - 1, hidden]
        embeds = weights[MTP + "embed_tokens.weight"][tokens[1:]].clone()  # token p + 1 at row p
        embeds[0] = 0  # position 0
        x = torch.cat(
            [_rms(embeds, weights[MTP + "enorm.weight"], eps), _rms(h, weights[MTP + "hnorm.weight"], eps)],
            -1,
        )
        x = x @ weights[MTP + "eh_proj.weight"].T
        return block(inputs_embeds=x[None]).logits[0, -1]

    return logits


def test_mtp_drafts_are_the_mtp_layers_greedy_predictions(mtp_model):
    llm = LLM(mtp_model[0], kv_cache_memory_mb=8, enable_prefix_caching=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": 1})  # fmt: skip
    proposer = llm.engine.speculator.proposer
    seen_logits, proposals = [], []
    compute_logits, propose = proposer.model.compute_logits, proposer.propose

    def recording_logits(hidden):
        out = compute_logits(hidden)
        seen_logits.append(out)
        return out

    def recording_propose(seqs, lengths):
        before = len(seen_logits)
        drafts = propose(seqs, lengths)
        proposals.append((seqs[0].token_slice(0, seqs[0].num_known_tokens), drafts[0], seen_logits[before:]))
        return drafts

    proposer.model.compute_logits, proposer.propose = recording_logits, recording_propose
    vocab = llm.engine.model_config.vocab_size
    prompt = torch.randint(3, vocab, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([prompt], params)
    oracle = _oracle(mtp_model)
    assert len(proposals) >= 2
    for tokens, drafts, logits in proposals:
        assert len(logits) == 1 and len(drafts) == 1
        want = oracle(tokens)
        torch.testing.assert_close(logits[0][0], want, rtol=0, atol=1e-4)
        assert drafts[0] == int(want.argmax())


def test_mtp_output_equals_plain_decoding(mtp_model):
    """Greedy requests with three drafts, prefix caching on (a prompt sharing another's prefix starts from
    cached blocks the MTP layer never saw): the output of plain decoding. Seeded sampled ones reproduce."""
    options = dict(kv_cache_memory_mb=8, max_num_seqs=4)
    plain = LLM(mtp_model[0], **options)
    spec = LLM(mtp_model[0], speculative_config={"method": "mtp", "num_speculative_tokens": 3}, **options)
    vocab = plain.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(5)
    base = torch.randint(3, vocab, (40,), generator=g).tolist()
    prompts = [base, base[:36] + [7, 8, 9], torch.randint(3, vocab, (9,), generator=g).tolist()]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, greedy)] == want
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    first, again = ([o.outputs[0].token_ids for o in spec.generate(prompts, sampled)] for _ in range(2))
    assert first == again and all(len(t) == 12 for t in first)
    stats = spec.engine.stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    spec.engine.block_manager.check_invariants([])


def test_mtp_needs_a_checkpoint_with_the_layer(tiny_llama_dir):
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        LLM(tiny_llama_dir, kv_cache_memory_mb=4, speculative_config={"method": "mtp"})


def test_mtp_checkpoint_serves_plainly_without_speculation(mtp_model):
    """The target ignores the MTP layer's tensors."""
    llm = LLM(mtp_model[0], kv_cache_memory_mb=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert Path(mtp_model[0], "config.json").exists()


def test_mtp_cache_too_small_gives_up_on_some_sequences(mtp_model):
    """A one-MiB MTP cache cannot hold four 480-token prompts: the sequences it cannot take draft nothing
    (their hidden states are not kept), and output is still plain decoding's."""
    options = dict(kv_cache_memory_mb=8, max_num_seqs=4)
    plain = LLM(mtp_model[0], **options)
    spec = LLM(mtp_model[0], **options, speculative_config={"method": "mtp", "draft_kv_cache_memory_mb": 1})
    vocab = plain.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, vocab, (480,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    proposer = spec.engine.speculator.proposer
    states = []
    finish = proposer.finish
    proposer.finish = lambda seq: states.append(proposer._states.get(seq)) or finish(seq)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    assert any(s.disabled for s in states) and not all(s.disabled for s in states)
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_usable_blocks  # every block came back
