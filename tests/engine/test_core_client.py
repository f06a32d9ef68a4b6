"""The engine core process behind EngineCoreClient: the same outputs as the in-process engine, aborts and bad
requests handled, and a core that dies ends its streams with an error and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from longserve import LLM, EngineConfig, SamplingParams
from longserve.engine.core_client import EngineCoreClient
from longserve.engine.protocol import EngineRequest, EngineShutDown, RequestFailed
from longserve.loading.errors import ModelLoadError

PARAMS = [
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1),
    SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[9]),
]


def _config(model: str) -> EngineConfig:
    return EngineConfig(model=model, kv_cache_memory_mb=4)


async def _collect(client: EngineCoreClient, prompt, params: SamplingParams, request_id: str):
    text = [""] * params.n
    last = None
    async for out in client.generate(prompt, params, request_id):
        for c in out.outputs:
            assert c.text.startswith(text[c.index])  # the text only grows
            text[c.index] = c.text
        last = out
    assert last is not None and last.finished
    return last


def test_outputs_equal_the_in_process_engine(tiny_llama_dir) -> None:
    prompts = [[5, 6, 7, 8], [11, 12, 13], [20, 21, 22, 23, 24]]
    expected = LLM(tiny_llama_dir, kv_cache_memory_mb=4).generate(prompts, PARAMS)

    async def main():
        client = await EngineCoreClient.create(_config(tiny_llama_dir))
        try:
            outs = await asyncio.gather(
                *(
                    _collect(client, p, params, f"r{i}")
                    for i, (p, params) in enumerate(zip(prompts, PARAMS, strict=True))
                )
            )
            embeddings, count = await client.embed([[5, 6, 7]])
            return outs, embeddings, count, client.stats()
        finally:
            await client.ashutdown()

    outs, embeddings, count, stats = asyncio.run(main())
    for ours, theirs in zip(outs, expected, strict=True):
        assert [c.token_ids for c in ours.outputs] == [c.token_ids for c in theirs.outputs]
        assert [c.text for c in ours.outputs] == [c.text for c in theirs.outputs]
        assert [c.finish_reason for c in ours.outputs] == [c.finish_reason for c in theirs.outputs]
        # Logprobs equal up to fp32 noise: the batches may be cut differently.
        if theirs.outputs[0].logprobs is not None:
            pairs = list(zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True))
            pairs += list(zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:], strict=True))
            assert ours.prompt_logprobs[0] is None and len(pairs) == 10 + 3
            for a, b in pairs:
                top_a, top_b = [t for t, _ in a.top], [t for t, _ in b.top]
                assert (a.token_id, a.rank, top_a) == (b.token_id, b.rank, top_b)
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert count == 3 and len(embeddings[0]) > 0
    assert stats.running == 0 and stats.kv_cache_usage == 0.0


def test_bad_requests_aborts_and_load_errors(tiny_llama_dir) -> None:
    async def main():
        client = await EngineCoreClient.create(_config(tiny_llama_dir))
        try:
            with pytest.raises(ValueError, match="maximum context length"):
                await anext(client.generate([5] * 10, SamplingParams(max_tokens=10**7)))
            with pytest.raises(ValueError, match="token ids"):
                client.limits.check_prompt([10**9], SamplingParams())
            # A stream closed early aborts its request in the core; the core keeps serving.
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            stream = client.generate([5, 6, 7], params, "gone")
            await anext(stream)
            await stream.aclose()
            last = await _collect(client, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4), "next")
            deadline = time.monotonic() + 5
            while client.stats().running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return last, client.stats()
        finally:
            await client.ashutdown()

    last, stats = asyncio.run(main())
    assert len(last.outputs[0].token_ids) == 4 and stats.running == 0
    with pytest.raises(ModelLoadError):
        asyncio.run(EngineCoreClient.create(_config("/nonexistent/model.gguf")))


def test_a_dead_core_fails_its_streams_and_is_replaced(tiny_llama_dir) -> None:
    async def main():
        client = await EngineCoreClient.create(_config(tiny_llama_dir))
        try:
            params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            stream = client.generate([5, 6, 7], params, "doomed")
            await anext(stream)
            os.kill(client._core.process.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(RequestFailed, match="died"):
                async for _ in stream:
                    pass
            failed_after = time.monotonic() - started
            request = EngineRequest("while-restarting", [5, 6], SamplingParams())
            with pytest.raises(EngineShutDown):  # while the new core loads: the worker answers 503
                await anext(client.stream(request))
            deadline = time.monotonic() + 60
            while not client.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            last = await _collect(client, [5, 6, 7], SamplingParams(temperature=0, max_tokens=3), "after")
            return failed_after, last
        finally:
            await client.ashutdown()

    failed_after, last = asyncio.run(main())
    assert failed_after < 5
    assert len(last.outputs[0].token_ids) == 3
