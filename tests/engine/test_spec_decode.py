"""Speculative decoding through the engine: greedy output equals plain decoding token for token (ngram and
suffix drafts, several model families, mixed with requests that do not draft, under preemption, prefix-cache
hits, chunked prefill, stop tokens and max_tokens inside an accepted run); seeded sampling reproduces; every
KV block comes back after aborts."""

import pytest
import torch
from engine_steps import engine_request, run_to_end

from longserve import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 5, "suffix_decoding_min_token_prob": 0.05}


def _repetitive_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    """Prompts that quote themselves (a segment three times, then part of it): drafts find matches."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        segment = torch.randint(3, vocab, (6 + i % 5,), generator=g).tolist()
        prompts.append(segment * 3 + segment[: 2 + i % 3])
    return prompts


def _greedy(llm: LLM, prompts, params) -> list[tuple]:
    results = llm.generate(prompts, params)
    return [
        [
            (o.token_ids, o.finish_reason, o.stop_reason, [e.token_id for e in o.logprobs or []])
            for o in r.outputs
        ]
        for r in results
    ]


def _all_blocks_free(llm: LLM) -> bool:
    blocks = llm.engine.block_manager
    blocks.check_invariants([])
    return blocks.num_free_blocks == blocks.num_usable_blocks and not llm.engine.scheduler.num_unfinished


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),  # ends inside a run
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=3.0),
        SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0
        ),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop_token_ids=[stop_token]),
    ]


@pytest.mark.parametrize("spec", [NGRAM, SUFFIX], ids=["ngram", "suffix"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_moe", "deepseek_v3"])
def test_greedy_output_equals_plain_decoding(tiny_model_dirs, family, spec):
    path = tiny_model_dirs[family]
    options = dict(kv_cache_memory_mb=8, max_num_seqs=8)
    plain, speculative = LLM(path, **options), LLM(path, speculative_config=spec, **options)
    prompts = _repetitive_prompts(plain.engine.model_config.vocab_size, 10, seed=3)
    params = (_mixed_params(stop_token=prompts[2][3]) * 2)[: len(prompts)]
    assert _greedy(speculative, prompts, params) == _greedy(plain, prompts, params)
    stats = speculative.engine.stats().spec_decode
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert _all_blocks_free(speculative)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_kv_blocks=41, block_size=4),  # preemption by recompute
        dict(max_num_batched_tokens=8, max_num_seqs=8),  # chunked prompts; drafts cut by the budget
    ],
    ids=["preempting", "chunked"],
)
def test_greedy_output_equals_plain_under_pressure(tiny_llama_dir, options):
    plain = LLM(tiny_llama_dir, **options)
    speculative = LLM(tiny_llama_dir, speculative_config=NGRAM, **options)
    prompts = _repetitive_prompts(plain.engine.model_config.vocab_size, 8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [plain.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    engine = speculative.engine
    results, internal = run_to_end(
        engine, [engine_request(engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    )
    assert [results[f"p{i}"].outputs[0].token_ids for i in range(len(prompts))] == want
    if "num_kv_blocks" in options:
        assert sum(seq.num_preemptions for r in internal for seq in r.seqs) > 0
    assert engine.stats().spec_decode.num_accepted_tokens > 0
    assert _all_blocks_free(speculative)


def test_prefix_cache_hits_keep_output_and_blocks(tiny_llama_dir):
    plain = LLM(tiny_llama_dir, block_size=4)
    speculative = LLM(tiny_llama_dir, block_size=4, speculative_config=SUFFIX)
    prompts = _repetitive_prompts(plain.engine.model_config.vocab_size, 4, seed=6)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _greedy(plain, prompts, params)
    assert _greedy(speculative, prompts, params) == want
    # Again from the prefix cache (the cached blocks hold verified tokens only) and with the outputs of the
    # first round in the suffix proposer's shared history.
    hits = speculative.engine.block_manager.prefix_hits
    assert _greedy(speculative, prompts, params) == want
    assert speculative.engine.block_manager.prefix_hits > hits
    assert _all_blocks_free(speculative)


def test_seeded_sampling_reproduces_with_drafts(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, speculative_config=NGRAM)
    prompts = _repetitive_prompts(llm.engine.model_config.vocab_size, 3, seed=7)
    params = SamplingParams(temperature=0.8, top_k=40, seed=11, max_tokens=24, ignore_eos=True, logprobs=1)
    first = _greedy(llm, prompts, params)
    drafted = llm.engine.stats().spec_decode.num_draft_tokens
    assert drafted > 0
    assert _greedy(llm, prompts[:1], params) == first[:1]  # alone as in a batch
    assert _greedy(llm, prompts, params) == first
    # n > 1: each completion drafts and verifies on its own, and the pair reproduces
    pair = SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=16, ignore_eos=True)
    assert _greedy(llm, prompts[:2], pair) == _greedy(llm, prompts[:2], pair)
    assert _all_blocks_free(llm)


def test_aborts_mid_run_return_every_block(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, block_size=4, speculative_config=NGRAM)
    engine = llm.engine
    prompts = _repetitive_prompts(engine.model_config.vocab_size, 8, seed=9)
    g = torch.Generator().manual_seed(1)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            temperature=0.5 * (i % 2), seed=i, max_tokens=10 + 7 * (i % 3), ignore_eos=True
        )
        engine.add_request(engine_request(engine, f"r{i}", prompt, params))
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        live = [rid for rid in engine.requests]
        if live and torch.rand(1, generator=g).item() < 0.3:
            engine.abort(live[int(torch.randint(len(live), (1,), generator=g))])
        holders = [seq for r in engine.requests.values() for seq in r.seqs if not seq.is_finished]
        engine.block_manager.check_invariants(holders)
    assert engine.stats().spec_decode.num_drafts > 0
    assert _all_blocks_free(llm)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "eagle"}, "method must be one of"),
        ({"method": "draft_model"}, "a model is given"),
        ({"method": "ngram", "model": "x"}, "a model is given"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "lookahead": 3}, "unknown keys"),
        ({"num_speculative_tokens": 3}, "needs a method"),
        ("{not json", "not valid JSON"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "must not exceed"),
    ],
)
def test_bad_speculative_config_is_refused(config, message):
    from longserve.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=config)


def test_only_mtp_excludes_async_scheduling():
    from longserve.config import EngineConfig

    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(speculative_config={"method": "mtp"}, async_scheduling=True)
    assert not EngineConfig(speculative_config={"method": "mtp"}, device="cuda").overlaps_steps("cuda")
    assert EngineConfig(speculative_config={"method": "ngram"}, device="cuda").overlaps_steps("cuda")


def test_steps_without_drafts_overlap_and_output_stays_plain(tiny_llama_dir):
    """With async scheduling, a step whose sequences have all paused drafting overlaps the next one (on a GPU
    that hides the host's work, as without speculation); verifications and the step before a sequence drafts
    again are read back at once. Greedy output stays the plain output."""
    options = dict(kv_cache_memory_mb=8, max_num_seqs=8, async_scheduling=True)
    plain, speculative = (
        LLM(tiny_llama_dir, **options),
        LLM(tiny_llama_dir, speculative_config=NGRAM, **options),
    )
    vocab = plain.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(9)
    prompts = _repetitive_prompts(vocab, 3, seed=8) + [torch.randint(3, vocab, (20,), generator=g).tolist()]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = _greedy(plain, prompts, params)
    engine = speculative.engine
    overlapped, step = [], engine.step

    def counting_step():
        deltas = step()
        overlapped.append(engine._in_flight is not None)  # this step's launch was left running
        return deltas

    engine.step = counting_step
    results, _ = run_to_end(
        engine, [engine_request(engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    )
    assert [results[f"p{i}"].outputs[0].token_ids for i in range(len(prompts))] == [w[0][0] for w in want]
    stats = engine.stats().spec_decode
    assert stats.num_accepted_tokens > 0 and any(overlapped) and not all(overlapped), overlapped
    assert _all_blocks_free(speculative)


@pytest.mark.parametrize("num_requests", [1, 8])
def test_requests_with_nothing_to_draft_overlap_most_steps(tiny_llama_dir, num_requests):
    """Text the proposer finds no match in (here: no 3-token repeat) would keep every step synchronous if it
    looked every step; with overlapped steps it pauses looking, growing up to 8 steps, and the output stays
    the plain output. The pauses of a batch end on the same steps, or some sequence would look at most."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 3, "prompt_lookup_max": 3}
    options = dict(kv_cache_memory_mb=8, async_scheduling=True)
    plain, speculative = (
        LLM(tiny_llama_dir, **options),
        LLM(tiny_llama_dir, speculative_config=spec, **options),
    )
    vocab = plain.engine.model_config.vocab_size
    order = torch.randperm(vocab - 3, generator=torch.Generator().manual_seed(3)) + 3
    prompts = [order[24 * i : 24 * (i + 1)].tolist() for i in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    engine = speculative.engine
    assert engine.speculator.pause_on_miss  # synchronous steps (the CPU's default) look every step:
    assert not LLM(tiny_llama_dir, speculative_config=spec).engine.speculator.pause_on_miss
    overlapped, step = [], engine.step

    def counting_step():
        deltas = step()
        overlapped.append(engine._in_flight is not None)
        return deltas

    engine.step = counting_step
    requests = [engine_request(engine, f"p{i}", prompt, params) for i, prompt in enumerate(prompts)]
    results, _ = run_to_end(engine, requests)
    expected = [out.outputs[0].token_ids for out in plain.generate(prompts, params)]
    assert [results[f"p{i}"].outputs[0].token_ids for i in range(num_requests)] == expected
    assert engine.stats().spec_decode.num_drafts <= 2 * num_requests  # next to nothing found: the case here
    assert sum(overlapped) > 0.75 * len(overlapped), overlapped


def _draft_config(path: str, **extra) -> dict:
    return {
        "method": "draft_model",
        "model": path,
        "num_speculative_tokens": 4,
        "draft_kv_cache_memory_mb": 4,
    } | extra


def test_a_draft_model_equal_to_the_target_has_every_draft_accepted(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, speculative_config=_draft_config(tiny_llama_dir))
    plain = LLM(tiny_llama_dir)
    prompts = _repetitive_prompts(plain.engine.model_config.vocab_size, 6, seed=12)
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    assert _greedy(llm, prompts, params) == _greedy(plain, prompts, params)
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    draft_blocks = llm.engine.speculator.proposer.blocks
    assert draft_blocks.num_free_blocks == draft_blocks.num_usable_blocks  # every shadow freed
    assert _all_blocks_free(llm)


def test_another_draft_model_keeps_greedy_output_and_seeded_sampling(tiny_llama_dir, tiny_model_dirs):
    spec = _draft_config(tiny_model_dirs["qwen2"])
    llm, plain = LLM(tiny_llama_dir, speculative_config=spec, block_size=4), LLM(tiny_llama_dir, block_size=4)
    prompts = _repetitive_prompts(plain.engine.model_config.vocab_size, 6, seed=13)
    params = _mixed_params(stop_token=prompts[1][2])
    assert _greedy(llm, prompts, params) == _greedy(plain, prompts, params)
    seeded = SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True)
    assert _greedy(llm, prompts, seeded) == _greedy(llm, prompts, seeded)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert _all_blocks_free(llm)


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(tiny_llama_dir, speculative_config=_draft_config(_default_model()))


def _default_model() -> str:
    from longserve.loading.default_model import default_model_path

    return str(default_model_path())


def test_only_steps_whose_every_row_samples_may_replay_a_graph(tiny_llama_dir):
    """A draft model catching up on a prompt schedules one-token chunks that sample nothing; a captured graph
    computes every row's logits, so only steps whose every row samples may replay one (an H100 run asserted)."""
    from longserve.engine.scheduler import ScheduledSequence
    from longserve.engine.sequence import Sequence

    runner = LLM(tiny_llama_dir, kv_cache_memory_mb=8).engine.runner
    params = SamplingParams(temperature=0)
    catching_up, decoding = (Sequence(name, 0, list(range(3, 13)), params, frozenset(), 20) for name in "ab")
    catching_up.num_computed_tokens, decoding.num_computed_tokens = 4, 9  # of 10 prompt tokens
    step = runner.describe([ScheduledSequence(decoding, 1), ScheduledSequence(catching_up, 1)])[0]
    assert step.logit_rows == [0] and not step.may_replay
    assert runner.describe([ScheduledSequence(decoding, 1)])[0].may_replay
    # Two tokens behind (a draft model after the target took all its drafts), every row's logits wanted:
    # decode rows that all sample, so the step may replay a graph.
    catching_up.num_computed_tokens = 8
    items = [ScheduledSequence(decoding, 1), ScheduledSequence(catching_up, 2, logits_every_row=True)]
    step, sample_index, _ = runner.describe(items)
    assert step.logit_rows == [0, 1, 2] and sample_index == [0, 1] and step.may_replay
