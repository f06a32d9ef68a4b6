"""Structured output in the engine: the bitmask equals llguidance's own mask, constrained sequences survive
preemption and n > 1, a grammar that fails or an abort during compilation touches no other request, compiled
grammars are cached, and min_tokens never leaves a grammar without a token."""

import json

import numpy as np
import pytest
import torch
from engine_steps import engine_request, run_to_end
from llguidance import LLMatcher

from longserve import LLM, SamplingParams
from longserve.engine.grammar_spec import check_structured_output
from longserve.engine.sampling_params import StructuredOutputParams
from longserve.engine.structured_output import GrammarCompiler, GrammarMasker

SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["word", "n", "ok"],
    "additionalProperties": False,
}
JSON_SPEC = StructuredOutputParams(json=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, kv_cache_memory_mb=4)


def _all_blocks_free(llm):
    manager = llm.engine.block_manager
    return manager.num_free_blocks == manager.num_usable_blocks and not llm.engine.scheduler.num_unfinished


def _run(engine, requests):
    return run_to_end(engine, requests)[0]


def test_the_mask_allows_exactly_what_the_matcher_allows(tiny_llm):
    compiler = GrammarCompiler(tiny_llm.tokenizer, tiny_llm.engine.model_config.vocab_size)
    matcher = compiler.compile(JSON_SPEC).result(timeout=30)
    tokens = tiny_llm.tokenizer.encode('{"word":"ab', add_special_tokens=False)
    assert matcher.consume_tokens(tokens)
    vocab = tiny_llm.engine.model_config.vocab_size
    logits = torch.zeros(2, vocab)
    other = compiler.compile(StructuredOutputParams(choice=["yes", "no"])).result(timeout=30)
    GrammarMasker().apply(logits, [matcher, other])
    for row, m in enumerate([matcher, other]):
        words = np.frombuffer(m.compute_bitmask(), dtype=np.uint32)
        expected = [t for t in range(vocab) if (int(words[t // 32]) >> (t % 32)) & 1]
        assert (logits[row] == 0).nonzero().flatten().tolist() == expected
        assert 0 < len(expected) < vocab


def test_constrained_output_survives_preemption_unchanged(tiny_llama_dir):
    small = LLM(tiny_llama_dir, num_kv_blocks=21, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=40, structured_output=JSON_SPEC)
    prompts = [[5 + i, 40 + i, 90 + i, 7] for i in range(8)]
    expected = [small.generate([p], params)[0].outputs[0].text for p in prompts]
    engine = small.engine
    requests = [engine_request(engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    finished, internal = run_to_end(engine, requests)
    assert sum(seq.num_preemptions for r in internal for seq in r.seqs) > 0
    assert [finished[f"p{i}"].outputs[0].text for i in range(8)] == expected
    for text in expected:
        assert set(json.loads(text)) == {"word", "n", "ok"}
    assert _all_blocks_free(small)


def test_each_of_n_samples_follows_the_grammar(tiny_llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=40, structured_output=JSON_SPEC)
    out = tiny_llm.generate(["hello"], params)[0]
    texts = [c.text for c in out.outputs]
    assert all(c.finish_reason == "stop" for c in out.outputs)
    assert len(set(texts)) > 1  # independent matchers, not one shared
    for text in texts:
        assert 0 <= json.loads(text)["n"] <= 99


def test_a_grammar_that_fails_to_compile_fails_only_its_request(tiny_llm):
    engine = tiny_llm.engine
    bad = StructuredOutputParams(regex="a(b")
    good = SamplingParams(
        temperature=0, max_tokens=8, structured_output=StructuredOutputParams(choice=["yes"])
    )
    requests = [
        engine_request(engine, "bad", "hi", SamplingParams(max_tokens=4, structured_output=bad)),
        engine_request(engine, "good", "hi", good),
        engine_request(engine, "plain", "hi", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)),
    ]
    finished = _run(engine, requests)
    assert "regex" in finished["bad"].error
    assert finished["good"].error is None and finished["good"].outputs[0].text == "yes"
    assert len(finished["plain"].outputs[0].token_ids) == 4
    assert _all_blocks_free(tiny_llm)


def test_abort_while_the_grammar_compiles_leaves_nothing_behind(tiny_llm):
    engine = tiny_llm.engine
    spec = StructuredOutputParams(regex="[a-z]{1,5}[0-9]{2}")
    engine.add_request(
        engine_request(engine, "gone", "hi", SamplingParams(max_tokens=8, structured_output=spec))
    )
    engine.abort("gone")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["gone"] and outputs[0].finished
    assert not engine.has_unfinished() and len(engine.grammars) == 0
    assert _all_blocks_free(tiny_llm)


def test_a_compiled_grammar_is_reused(tiny_llm):
    compiler = GrammarCompiler(tiny_llm.tokenizer, tiny_llm.engine.model_config.vocab_size)
    first = compiler.compile(JSON_SPEC).result(timeout=30)
    spent = compiler.compile_seconds["json"]
    again = compiler.compile(StructuredOutputParams(json=json.dumps(SCHEMA)))
    assert again.done()  # from the cache: no trip through the compile thread
    assert again.result() is not first  # a copy: each sequence advances its own
    assert compiler.compile_seconds["json"] == spent
    assert first.consume_tokens(tiny_llm.tokenizer.encode('{"word"', add_special_tokens=False))
    assert not again.result().is_stopped()


def test_min_tokens_never_leaves_a_finished_grammar_without_a_token(tiny_llm):
    params = SamplingParams(
        temperature=0, max_tokens=10, min_tokens=5, structured_output=StructuredOutputParams(choice=["ok"])
    )
    out = tiny_llm.generate(["say"], params)[0].outputs[0]
    assert out.text == "ok" and out.finish_reason == "stop"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (StructuredOutputParams(json='{"type": "objectx"}'), "json"),
        (StructuredOutputParams(json="[1, 2]"), "json"),
        (StructuredOutputParams(regex="(("), "regex"),
        (StructuredOutputParams(grammar="root ::= ("), "grammar"),
        # text NFC normalization changes: llguidance would mask by one form and commit by the other
        (StructuredOutputParams(choice=["ok", "\uf900"]), "choice"),
        (StructuredOutputParams(regex="e\u0301+"), "regex"),
        (StructuredOutputParams(json='{"enum": ["\\u212b"]}'), "json"),
    ],
)
def test_invalid_grammars_raise_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        check_structured_output(spec)


def test_structured_output_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(regex="a", choice=["a"])
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_regex("a+")) == ""


def test_the_mask_after_drafts_is_the_matchers_after_those_tokens(tiny_llm):
    compiler = GrammarCompiler(tiny_llm.tokenizer, tiny_llm.engine.model_config.vocab_size)
    matcher = compiler.compile(JSON_SPEC).result(timeout=30)
    drafts = tiny_llm.tokenizer.encode('{"word":"a', add_special_tokens=False)
    vocab = tiny_llm.engine.model_config.vocab_size
    logits = torch.zeros(2, vocab)
    GrammarMasker().apply(logits, [matcher, matcher], [[], drafts])
    assert matcher.consume_tokens(drafts)  # the masker took it back to where it was
    advanced = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32)
    expected = [t for t in range(vocab) if (int(advanced[t // 32]) >> (t % 32)) & 1]
    assert (logits[1] == 0).nonzero().flatten().tolist() == expected
    assert (logits[0] == 0).sum() != (logits[1] == 0).sum()


def test_speculative_drafts_keep_constrained_output_unchanged(tiny_llama_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    plain, speculative = LLM(tiny_llama_dir), LLM(tiny_llama_dir, speculative_config=spec)
    example = '{"word":"abc","n":12,"ok":true} {"word":"abc","n":12,"ok":true} {"word":"'
    params = SamplingParams(temperature=0, max_tokens=40, structured_output=JSON_SPEC)
    want = [o.outputs[0].text for o in plain.generate([example, example[:30]], params)]
    got = [o.outputs[0].text for o in speculative.generate([example, example[:30]], params)]
    assert got == want
    assert all(set(json.loads(text)) == {"word", "n", "ok"} for text in got)
    assert speculative.engine.stats().spec_decode.num_accepted_tokens > 0
    assert _all_blocks_free(speculative)


def test_a_grammar_that_breaks_mid_output_fails_as_the_requests_own_error(tiny_llm):
    """A matcher that goes into its error state (llguidance: too complex, or nothing left) ends only its
    request, marked as the client's error (a 400 at the API), never as the engine's."""
    engine = tiny_llm.engine
    params = SamplingParams(
        temperature=0, max_tokens=8, structured_output=StructuredOutputParams(choice=["yes"])
    )
    engine.add_request(engine_request(engine, "breaks", "hi", params))
    engine.add_request(engine_request(engine, "other", "hi", SamplingParams(temperature=0, max_tokens=3)))
    deltas = []
    while engine.has_unfinished():
        seq = engine.requests["breaks"].seqs[0] if "breaks" in engine.requests else None
        if seq is not None and seq.grammar is not None and seq.grammar.is_error() is False:
            seq.grammar.consume_token(
                tiny_llm.tokenizer.encode("zzz", add_special_tokens=False)[0]
            )  # rejected
        deltas += engine.step()
    failed = [d for d in deltas if d.request_id == "breaks" and d.error]
    assert failed and failed[0].client_error and "structured output" in failed[0].error
    assert not any(d.error for d in deltas if d.request_id == "other")
    assert _all_blocks_free(tiny_llm)
