"""EngineCoreClient: streams interleave on the engine thread, the event loop stays free, abort frees KV blocks."""

import asyncio
import time

import pytest

from longserve import EngineConfig, EngineCoreClient, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    yield engine
    engine.shutdown()


def _blocks_all_free(engine):
    manager = engine.engine.block_manager
    return manager.num_free_blocks == manager.num_usable_blocks


async def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_concurrent_streams_interleave_and_deltas_add_up(engine):
    async def consume(i, order):
        text, tokens = "", []
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        async for out in engine.generate([5 + i, 6, 7, 8], params, request_id=f"s{i}"):
            order.append(i)
            assert out.outputs[0].text.startswith(text)
            text, tokens = out.outputs[0].text, list(out.outputs[0].token_ids)
            last = out
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert tokens == last.outputs[0].token_ids and text == last.outputs[0].text
        return tokens

    async def main():
        order = []
        results = await asyncio.gather(*(consume(i, order) for i in range(8)))
        return order, results

    order, results = asyncio.run(main())
    assert all(len(r) == 12 for r in results)
    # Interleaved: the first stream is not done before the last one has started.
    assert order.index(7) < len(order) - 1 - order[::-1].index(0)
    assert _blocks_all_free(engine)


def test_event_loop_is_not_blocked_while_generating(engine):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        start = time.monotonic()
        async for _ in engine.generate(list(range(3, 200)), params):
            pass
        elapsed = time.monotonic() - start
        task.cancel()
        return ticks, elapsed

    ticks, elapsed = asyncio.run(main())
    assert ticks >= 0.3 * elapsed / 0.005  # the loop kept ticking through the forward passes


def test_closing_a_stream_early_aborts_the_request_and_frees_blocks(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = engine.generate([5, 6, 7], params, request_id="gone")
        async for _ in stream:
            break  # the client went away
        await stream.aclose()
        await _wait_until(lambda: "gone" not in engine.engine.requests and _blocks_all_free(engine))

    asyncio.run(main())


def test_abort_ends_the_stream_with_finish_reason_abort(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        outs = []
        async for out in engine.generate([5, 6, 7], params, request_id="stop-me"):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("stop-me")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 500
    assert _blocks_all_free(engine)


def test_bad_request_raises_in_the_caller_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens"):
            SamplingParams(max_tokens=0)
        with pytest.raises(ValueError, match="maximum context length"):
            async for _ in engine.generate([5] * 10_000, SamplingParams(max_tokens=1)):
                pass
        outs = [out async for out in engine.generate([5, 6], SamplingParams(max_tokens=3, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 3


def test_engine_is_built_on_the_thread_that_steps_it(monkeypatch, tiny_llama_dir) -> None:
    """CPU compute threads belong to the thread that first runs torch work: loading on another thread would
    leave the engine stepping with a second, competing OpenMP team (issue 12)."""
    import threading

    from longserve.engine.engine import LLMEngine

    seen: dict[str, set[int]] = {"init": set(), "step": set()}
    init, step = LLMEngine.__init__, LLMEngine.step

    def recording_init(self, *args, **kwargs):
        seen["init"].add(threading.get_ident())
        init(self, *args, **kwargs)

    def recording_step(self):
        seen["step"].add(threading.get_ident())
        return step(self)

    monkeypatch.setattr(LLMEngine, "__init__", recording_init)
    monkeypatch.setattr(LLMEngine, "step", recording_step)

    async def main() -> None:
        engine = await EngineCoreClient.create(
            EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True
        )
        try:
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=3, temperature=0)):
                pass
        finally:
            await engine.ashutdown()

    asyncio.run(main())
    assert len(seen["init"]) == 1 and seen["init"] == seen["step"]
    assert threading.get_ident() not in seen["init"]


def test_a_thread_core_left_running_by_a_short_shutdown_stops_quietly(monkeypatch, tiny_llama_dir) -> None:
    """``shutdown(timeout)`` terminates the context it shares with a thread core that has not stopped yet; the
    core takes that as its order to stop, with no exception escaping its thread."""
    import threading

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    client = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    core = client._core.thread
    entered = threading.Event()
    real_run = client.engine.step

    def slow_step():  # the core is mid-step when the client gives up waiting
        entered.set()
        time.sleep(0.5)
        return real_run()

    monkeypatch.setattr(client.engine, "step", slow_step)

    async def start() -> None:
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        stream = client.generate([5, 6, 7], params, request_id="left")
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()

    asyncio.run(start())
    client.shutdown(timeout=0.05)
    core.join(10)
    assert not core.is_alive()
    assert not escaped, [e.exc_value for e in escaped]
