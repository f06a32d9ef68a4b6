"""Prefix caching: outputs equal the uncached engine's (chunked prefill, preemption, n > 1, MoBA), hits are
reported, prompt-logprob requests bypass the cache, and the block manager's books balance under a random mix."""

from __future__ import annotations

import random

import pytest
from engine_steps import engine_request

from longserve import LLM, SamplingParams
from longserve.engine.engine import LLMEngine
from longserve.engine.kv_cache import BlockManager
from longserve.engine.sequence import Sequence

SYSTEM = list(range(40, 90))  # a 50-token shared prefix: three full blocks of 16


def _prompts() -> list[list[int]]:
    return [SYSTEM + [5 + i, 6, 7 + i] for i in range(4)] + [SYSTEM[:20] + [9, 9]]


def _run_twice(model: str, **options):
    """Outputs of the same batch, run twice on one engine (the second run can hit the first's blocks)."""
    llm = LLM(model, **options)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1),
        SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True),
    ]
    runs = []
    for _ in range(2):
        runs.append([llm.generate(p, params[i % 2])[0] for i, p in enumerate(_prompts())])
    return llm, runs


def _assert_same(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        if b.outputs[0].logprobs:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 24, "max_num_seqs": 8},  # chunked prefill over cached prefixes
        {
            "num_kv_blocks": 12,
            "max_num_batched_tokens": 64,
            "max_num_seqs": 8,
        },  # tight: preemption and eviction
        {"attention": "moba", "moba_chunk_size": 32, "moba_topk": 2, "moba_full_layers": 0},
    ],
    ids=["plain", "chunked", "preempting", "moba"],
)
def test_cached_outputs_equal_uncached(tiny_llama_dir, options) -> None:
    _, uncached = _run_twice(tiny_llama_dir, enable_prefix_caching=False, **options)
    llm, cached = _run_twice(tiny_llama_dir, **options)
    for run in (*cached, uncached[1]):
        _assert_same(run, uncached[0])
    assert max(out.num_cached_tokens for out in cached[1]) > 0  # the second run did hit
    stats = llm.engine.stats()
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    manager = llm.engine.block_manager
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks  # cached blocks nobody holds count as free


def test_hits_are_whole_blocks_and_reported(tiny_llama_dir) -> None:
    llm = LLM(tiny_llama_dir)
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate(SYSTEM + [1, 2], params)[0]
    second = llm.generate(SYSTEM + [3, 4], params)[0]
    again = llm.generate(SYSTEM + [1, 2], params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48  # 3 full blocks of the shared 50 tokens
    # 52 tokens: the last is always computed, so 3 blocks (48), not the whole prompt
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids
    with_logprobs = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    bypass = llm.generate(SYSTEM + [1, 2], with_logprobs)[0]
    assert bypass.num_cached_tokens == 0 and len(bypass.prompt_logprobs) == 52
    off = LLM(tiny_llama_dir, enable_prefix_caching=False)
    off.generate(SYSTEM + [1, 2], params)
    assert off.generate(SYSTEM + [1, 2], params)[0].num_cached_tokens == 0


def test_n_greater_than_one_shares_the_prompt(tiny_llama_dir) -> None:
    llm = LLM(tiny_llama_dir)
    out = llm.generate(SYSTEM + [1, 2, 3], SamplingParams(n=3, temperature=0.9, seed=3, max_tokens=4))[0]
    assert len(out.outputs) == 3
    # completions 2 and 3 start from the first one's 3 cached prompt blocks: 3 x 48 of 3 x 53 tokens
    assert llm.engine.stats().prefix_cache_hits == 2 * 48


def test_block_books_balance_under_a_random_mix(tiny_llama_dir) -> None:
    engine = LLMEngine(
        LLM(tiny_llama_dir, num_kv_blocks=24, max_num_batched_tokens=48, max_num_seqs=8).engine.config
    )
    rng = random.Random(0)
    prefixes = [list(range(10 + 20 * k, 10 + 20 * k + 33)) for k in range(3)]
    live: list[str] = []
    for step in range(300):
        if rng.random() < 0.3 and len(engine.requests) < 6:
            prompt = rng.choice(prefixes)[: rng.randint(1, 33)] + [rng.randint(1, 200)]
            params = SamplingParams(n=rng.choice([1, 2]), temperature=0, max_tokens=rng.randint(1, 20))
            request_id = f"r{step}"
            engine.add_request(engine_request(engine, request_id, prompt, params))
            live.append(request_id)
        if live and rng.random() < 0.08:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        holders = [seq for request in engine.requests.values() for seq in request.seqs]
        engine.block_manager.check_invariants(holders)
    while engine.has_unfinished():
        engine.step()
    manager = engine.block_manager
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks and manager.num_cached_blocks > 0
    manager.reset_prefix_cache()
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == manager.num_usable_blocks


def test_eviction_takes_least_recently_released_first() -> None:
    manager = BlockManager(5, 2, enable_prefix_caching=True)  # 4 usable blocks of 2 tokens

    def run(tokens: list[int]) -> Sequence:
        seq = Sequence("r", 0, tokens, SamplingParams(), frozenset(), 100)
        hits = manager.match_prefix(seq)
        manager.start_from(seq, hits)
        manager.grow(seq, len(tokens))
        seq.num_computed_tokens = len(tokens)
        manager.cache_computed(seq)
        manager.free(seq)
        return seq

    run([1, 2, 3, 4, 5])  # caches [1,2], [3,4]
    run([7, 8, 9])  # caches [7,8]
    assert manager.num_cached_blocks == 3
    run([10, 11, 12])  # needs 2 blocks: the uncached free one, then the least recent cached one
    first = Sequence("r", 0, [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 100)
    assert len(manager.match_prefix(first)) == 1  # [3,4], the first's tail, went first; [1,2] survived
    second = Sequence("r", 0, [7, 8, 9], SamplingParams(), frozenset(), 100)
    assert len(manager.match_prefix(second)) == 1
    manager.check_invariants([])
