"""One request's failure ends that request only: NaN logits, a sampler or detokenizer bug, a failed forward
pass (which fails just the sequences of its step), and shutdown, which ends every open stream at once."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from engine_steps import engine_request, run_to_end

from longserve import EngineConfig, EngineCoreClient, SamplingParams
from longserve.engine.engine import LLMEngine
from longserve.engine.protocol import EngineShutDown, RequestFailed
from longserve.engine.sampler import Sampler
from longserve.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=3)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlapped"])
def core(tiny_llama_dir, request) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4, async_scheduling=request.param))


def _run(core: LLMEngine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]) -> dict:
    requests = [engine_request(core, rid, prompt, params[rid]) for rid, prompt in prompts.items()]
    last, _ = run_to_end(core, requests)
    manager = core.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks, "a KV block was left behind"
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    return last


def _alone(core: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return _run(core, {"alone": prompt}, {"alone": params})["alone"].outputs[0].token_ids


def _poison_row(core: LLMEngine, monkeypatch, request_id: str, value: float) -> None:
    """Make the sampled logits of ``request_id`` all ``value`` (NaN, inf) in every step."""
    execute = core.runner.execute

    def poisoned(scheduled, fed=None):
        result = execute(scheduled, fed)
        for row, index in enumerate(result.sample_index):
            if scheduled[index].seq.request_id == request_id:
                with torch.inference_mode():
                    result.sample_logits[row] = value
        return result

    monkeypatch.setattr(core.runner, "execute", poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_only_their_request(core, monkeypatch, value):
    expected_greedy = _alone(core, [5, 6, 7], GREEDY)
    expected_sampled = _alone(core, [9, 8, 7], SAMPLED)
    _poison_row(core, monkeypatch, "bad", value)
    prompts = {"good": [5, 6, 7], "bad": [4, 4, 4], "sampled": [9, 8, 7]}
    params = {"good": GREEDY, "bad": SAMPLED, "sampled": SAMPLED}
    last = _run(core, prompts, params)
    assert "not finite" in last["bad"].error and last["bad"].outputs[0].finish_reason == "abort"
    assert last["good"].error is None and last["good"].outputs[0].token_ids == expected_greedy
    assert last["sampled"].error is None and last["sampled"].outputs[0].token_ids == expected_sampled


def test_a_sampler_bug_costs_only_the_row_that_hits_it(core, monkeypatch):
    expected = _alone(core, [5, 6, 7], SAMPLED)
    sample = Sampler._sample

    def buggy(self, logits, seqs):
        if any(seq.request_id == "bad" for seq in seqs):
            raise IndexError("injected sampler bug")
        return sample(self, logits, seqs)

    monkeypatch.setattr(Sampler, "_sample", buggy)
    last = _run(core, {"good": [5, 6, 7], "bad": [4, 4]}, {"good": SAMPLED, "bad": SAMPLED})
    assert "injected sampler bug" in last["bad"].error
    assert last["good"].error is None and last["good"].outputs[0].token_ids == expected


def test_a_detokenizer_error_fails_only_its_request(core, monkeypatch):
    expected = _alone(core, [5, 6, 7], GREEDY)
    append = Sequence.append_token

    def failing(seq, token, logprob):
        if seq.request_id == "bad" and len(seq.output_token_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return append(seq, token, logprob)

    monkeypatch.setattr(Sequence, "append_token", failing)
    last = _run(core, {"good": [5, 6, 7], "bad": [4, 4]}, {"good": GREEDY, "bad": GREEDY})
    assert "UnicodeDecodeError" in last["bad"].error and len(last["bad"].outputs[0].token_ids) == 2
    assert last["good"].error is None and last["good"].outputs[0].token_ids == expected


@pytest.mark.parametrize("overlapped", [False, True])
def test_a_failed_forward_pass_fails_its_step_and_spares_requests_not_in_it(
    tiny_llama_dir, monkeypatch, overlapped
):
    # One sequence per step: the failing step holds only the first request; the second runs after it.
    config = EngineConfig(
        model=tiny_llama_dir, kv_cache_memory_mb=4, max_num_seqs=1, async_scheduling=overlapped
    )
    core = LLMEngine(config)
    expected = _alone(core, [5, 6, 7], GREEDY)
    execute, calls = core.runner.execute, []

    def fails_once(scheduled, fed=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected kernel failure")
        return execute(scheduled, fed)

    monkeypatch.setattr(core.runner, "execute", fails_once)
    last = _run(core, {"first": [4, 4], "second": [5, 6, 7]}, {"first": GREEDY, "second": GREEDY})
    assert "injected kernel failure" in last["first"].error
    assert last["second"].error is None and last["second"].outputs[0].token_ids == expected


def test_async_streams_see_request_failed_and_neighbours_finish(tiny_llama_dir, monkeypatch):
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    try:
        _poison_row(engine.engine, monkeypatch, "bad", float("nan"))

        async def collect(rid, prompt, params):
            try:
                return [out async for out in engine.generate(prompt, params, request_id=rid)][-1]
            except RequestFailed as exc:
                return exc

        async def both():
            return await asyncio.gather(collect("good", [5, 6], GREEDY), collect("bad", [4, 4], SAMPLED))

        good, bad = asyncio.run(both())
        assert isinstance(bad, RequestFailed) and "not finite" in str(bad)
        assert good.finished and good.outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()


def test_begin_shutdown_ends_open_streams_at_once(tiny_llama_dir):
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def scenario():
        async def consume(i):
            with pytest.raises(EngineShutDown):
                async for _ in engine.generate([5, 6, i], long, request_id=f"s{i}"):
                    pass

        tasks = [asyncio.create_task(consume(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        start = time.monotonic()
        engine.begin_shutdown()
        await asyncio.gather(*tasks)
        ended = time.monotonic() - start
        await engine.ashutdown()
        with pytest.raises(EngineShutDown):
            async for _ in engine.generate([5], long):
                pass
        with pytest.raises(EngineShutDown):
            await engine.embed(["x"])
        return ended

    assert asyncio.run(scenario()) < 1.0
