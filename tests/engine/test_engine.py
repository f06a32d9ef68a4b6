"""LLMEngine behaviour through the offline LLM API: batching invariance, seeds, stops, KV-block accounting."""

import pytest
import torch
from engine_steps import engine_request, run_to_end

from longserve import LLM, SamplingParams
from longserve.engine.sequence import SequenceStatus


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlapped"])
def tiny_llm(tiny_llama_dir, request):
    return LLM(tiny_llama_dir, kv_cache_memory_mb=4, async_scheduling=request.param)


def _prompts(llm, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = llm.engine.model_config.vocab_size
    return [
        torch.randint(3, vocab, (int(n),), generator=generator).tolist()
        for n in torch.randint(3, 60, (count,), generator=generator)
    ]


def _all_blocks_free(llm):
    manager = llm.engine.block_manager
    return manager.num_free_blocks == manager.num_usable_blocks and not llm.engine.scheduler.num_unfinished


def test_greedy_output_is_the_same_alone_and_batched_with_15_others(tiny_llm):
    prompts = _prompts(tiny_llm, 16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batched = tiny_llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        alone = tiny_llm.generate([prompt], params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    assert _all_blocks_free(tiny_llm)


def test_seeded_sampling_reproduces_whatever_the_batch(tiny_llm):
    prompt = _prompts(tiny_llm, 1, seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    first = tiny_llm.generate([prompt], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = tiny_llm.generate([prompt] + _prompts(tiny_llm, 5, seed=4), [params] + [others] * 5)
    assert batch[0].outputs[0].token_ids == first
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert tiny_llm.generate([prompt], different_seed)[0].outputs[0].token_ids != first


def test_n_completions_stop_tokens_and_max_tokens(tiny_llm):
    prompt = _prompts(tiny_llm, 1, seed=5)[0]
    out = tiny_llm.generate(
        [prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=7, ignore_eos=True)
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 7 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # independent samples
    greedy = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_token = greedy.outputs[0].token_ids[4]
    stopped = tiny_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_token])
    )
    completion = stopped[0].outputs[0]
    first_hit = greedy.outputs[0].token_ids.index(stop_token)
    assert completion.token_ids == greedy.outputs[0].token_ids[: first_hit + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_token


def test_stop_string_truncates_text_and_ends_generation(tiny_llm):
    prompt = _prompts(tiny_llm, 1, seed=6)[0]
    full = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[
        0
    ].outputs[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop.strip()
    out = tiny_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    )
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == text[: text.index(stop)]


@pytest.mark.parametrize("overlapped", [False, True])
def test_preemption_by_recompute_keeps_greedy_output_and_frees_every_block(tiny_llama_dir, overlapped):
    # 20 usable blocks of 4 slots for 8 sequences that each grow to ~12 blocks: preemption is unavoidable.
    small = LLM(tiny_llama_dir, num_kv_blocks=21, block_size=4, async_scheduling=overlapped)
    prompts = _prompts(small, 8, seed=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [small.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    engine = small.engine
    requests = [engine_request(engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    results, internal = run_to_end(engine, requests)
    assert [results[f"p{i}"].outputs[0].token_ids for i in range(8)] == expected
    assert sum(seq.num_preemptions for r in internal for seq in r.seqs) > 0
    assert _all_blocks_free(small)


def test_abort_and_mixed_finishes_return_every_block(tiny_llm):
    engine = tiny_llm.engine
    prompts = _prompts(tiny_llm, 6, seed=9)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=5 + 10 * (i % 2), ignore_eos=True)
        engine.add_request(engine_request(engine, f"mix-{i}", prompt, params))
    for _ in range(3):
        engine.step()
    engine.abort("mix-1")
    engine.abort("mix-4")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.seqs[0].finish_reason
    assert finished["mix-1"] == finished["mix-4"] == "abort"
    assert finished["mix-0"] == "length"
    assert _all_blocks_free(tiny_llm)


def test_prompt_over_the_context_length_is_a_clear_error(tiny_llm):
    limit = tiny_llm.engine.max_model_len
    with pytest.raises(ValueError, match="maximum context length is"):
        tiny_llm.generate([[5] * limit], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"\d+ in the prompt, 100 for the completion"):
        tiny_llm.generate([[5] * (limit - 50)], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids must be in"):
        tiny_llm.generate([[5, 10**6]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="must not be empty"):
        tiny_llm.generate([""], SamplingParams(max_tokens=1))
    assert _all_blocks_free(tiny_llm)


def test_logprobs_and_prompt_logprobs_agree_with_a_full_forward(tiny_llm):
    prompt = _prompts(tiny_llm, 1, seed=10)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = tiny_llm.generate([prompt], params)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for entry, token in zip(completion.logprobs, completion.token_ids, strict=True):
        assert entry.token_id == token and entry.rank == 1  # greedy picks the top token
        assert len(entry.top) == 3 and entry.top[0][0] == token
        assert entry.top[0][1] == pytest.approx(entry.logprob)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    # Prompt logprobs are what a second request scoring prompt + output sees for the output tokens.
    again = tiny_llm.generate(
        [prompt + completion.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0)
    )[0]
    for i, entry in enumerate(completion.logprobs):
        assert again.prompt_logprobs[len(prompt) + i].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_sequences_leave_running_state_when_done(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request(
        engine_request(engine, "status", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    )
    request = engine.requests["status"]
    while engine.has_unfinished():
        engine.step()
    assert all(seq.status is SequenceStatus.FINISHED for seq in request.seqs)


def test_int8_quantization_serves_decode_steps_and_keeps_prompts_exact(tiny_llama_dir):
    exact = LLM(tiny_llama_dir, kv_cache_memory_mb=4)
    quantized = LLM(tiny_llama_dir, kv_cache_memory_mb=4, quantization="int8")
    prompt = _prompts(exact, 1, seed=11)[0] * 2  # > 16 tokens: the prompt step takes the exact path
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    exact_lp = [e.logprob for e in exact.generate([prompt], params)[0].prompt_logprobs[1:]]
    quant_lp = [e.logprob for e in quantized.generate([prompt], params)[0].prompt_logprobs[1:]]
    assert exact_lp == pytest.approx(quant_lp, abs=1e-5)
    # Decode steps (one row) run int8: close to the exact logprobs, but not bit-identical.
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    exact_out = exact.generate([prompt], greedy)[0].outputs[0]
    quant_out = quantized.generate([prompt], greedy)[0].outputs[0]
    # Compare while both saw the same context: up to and including the first step that picked another
    # token (near-tied tokens may swap under int8; their logprobs are still close).
    same = next(
        (i for i, (a, b) in enumerate(zip(exact_out.token_ids, quant_out.token_ids, strict=True)) if a != b),
        7,
    )
    gaps = [abs(exact_out.logprobs[i].logprob - quant_out.logprobs[i].logprob) for i in range(same + 1)]
    assert max(gaps) < 0.5 and any(gap > 0 for gap in gaps), gaps
