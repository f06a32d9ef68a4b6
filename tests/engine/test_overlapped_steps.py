"""Overlapped (async) scheduling gives what synchronous steps give: the same tokens, logprobs, finishes and
prefix-cache hits for a mixed batch, every KV block back, aborts of a step still in flight. The host work is
the same on every device, so the CPU runs it here; tests marked gpu repeat it where it overlaps for real."""

import pytest
import torch
from engine_steps import engine_request, run_to_end

from longserve import LLM, SamplingParams

MIXED = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=9, logprobs=3, prompt_logprobs=2),
    SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=11, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=1.1, top_p=0.8, min_p=0.05, seed=8, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=9, max_tokens=8, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(temperature=0, min_tokens=5, max_tokens=7),
    SamplingParams(n=2, temperature=1.0, seed=10, max_tokens=6, ignore_eos=True),
]


def _prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(5 + 11 * i % 37),), generator=g).tolist() for i in range(count)]


def _outputs(llm: LLM, prompts, params) -> list[tuple]:
    results = llm.generate(prompts, params)
    return [
        (
            [(o.token_ids, o.finish_reason, o.stop_reason) for o in r.outputs],
            [[(e.token_id, e.rank, [t for t, _ in e.top]) for e in o.logprobs or []] for o in r.outputs],
            [[e.logprob for e in o.logprobs or []] for o in r.outputs],
            [e.token_id if e else None for e in r.prompt_logprobs or []],
        )
        for r in results
    ]


def _all_blocks_free(llm: LLM) -> bool:
    blocks = llm.engine.block_manager
    return blocks.num_free_blocks == blocks.num_usable_blocks and not llm.engine.scheduler.num_unfinished


@pytest.fixture(scope="module")
def pair(tiny_llama_dir):
    options = dict(kv_cache_memory_mb=4, max_num_batched_tokens=64, max_num_seqs=8)
    return LLM(tiny_llama_dir, **options), LLM(tiny_llama_dir, async_scheduling=True, **options)


def test_a_mixed_batch_gives_the_same_outputs_overlapped(pair):
    sync, overlapped = pair
    assert not sync.engine.overlap_steps and overlapped.engine.overlap_steps
    prompts = _prompts(sync.engine.model_config.vocab_size, len(MIXED) * 2, seed=1)
    params = MIXED * 2
    want, got = _outputs(sync, prompts, params), _outputs(overlapped, prompts, params)
    for w, g in zip(want, got, strict=True):
        assert g[:2] == w[:2] and g[3] == w[3]
        for w_lp, g_lp in zip(w[2], g[2], strict=True):
            torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(w_lp), rtol=0, atol=1e-5)
    # Once more: the prompts' blocks come from the prefix cache now, alike in both.
    again, want_again = _outputs(overlapped, prompts, params), _outputs(sync, prompts, params)
    assert [(a[:2], a[3]) for a in again] == [(w[:2], w[3]) for w in want_again]
    assert overlapped.engine.block_manager.prefix_hits == sync.engine.block_manager.prefix_hits
    assert _all_blocks_free(sync) and _all_blocks_free(overlapped)


def test_greedy_steps_do_overlap_and_read_back_one_step_late(pair):
    _, overlapped = pair
    engine = overlapped.engine
    prompt = _prompts(engine.model_config.vocab_size, 1, seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request(engine_request(engine, "late", prompt, params))
    seen, in_flight = [], 0
    while engine.has_unfinished():
        deltas = engine.step()
        in_flight += engine._in_flight is not None
        seen += [len(d.seqs[0].token_ids) for d in deltas if d.seqs]
    # The first step (the prompt) is read back one call late, and so is every decode after it.
    assert in_flight == 6 and sum(seen) == 6
    assert _all_blocks_free(overlapped)


def test_aborting_requests_with_a_step_in_flight_returns_every_block(pair):
    _, overlapped = pair
    engine = overlapped.engine
    prompts = _prompts(engine.model_config.vocab_size, 6, seed=3)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            temperature=0.8 * (i % 2), seed=i, max_tokens=4 + 8 * (i % 3), ignore_eos=True
        )
        engine.add_request(engine_request(engine, f"a{i}", prompt, params))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    engine.abort("a1")
    engine.abort("a4")
    finished = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finished:
                finished[delta.request_id] = delta.seqs[0].finish_reason if delta.seqs else None
    assert finished["a1"] == finished["a4"] == "abort"
    assert finished["a0"] == "length" and len(finished) == 6
    assert _all_blocks_free(overlapped)


def test_preemption_with_tokens_in_flight_keeps_greedy_output(tiny_llama_dir):
    # 20 usable blocks of 4 slots for 8 sequences that each grow to ~12 blocks: preemption is unavoidable.
    small = LLM(tiny_llama_dir, num_kv_blocks=21, block_size=4, async_scheduling=True)
    prompts = _prompts(small.engine.model_config.vocab_size, 8, seed=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [small.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    requests = [engine_request(small.engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    results, internal = run_to_end(small.engine, requests)
    assert [results[f"p{i}"].outputs[0].token_ids for i in range(8)] == expected
    assert sum(seq.num_preemptions for r in internal for seq in r.seqs) > 0
    assert _all_blocks_free(small)


def test_min_tokens_holds_back_stops_with_tokens_in_flight(pair):
    sync, overlapped = pair
    prompt = _prompts(sync.engine.model_config.vocab_size, 1, seed=4)[0]
    free = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    stop = free.outputs[0].token_ids[1]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[stop])
    want = sync.generate([prompt], params)[0].outputs[0]
    got = overlapped.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) >= 4
    assert stop not in got.token_ids[:4]
