"""The worker's front-end stream (ZMQ): requests in as token ids, token deltas out, one frame per step per API
server; admission (429), aborts and a silent API server handled as its HTTP endpoints handle them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from longserve import LLM, EngineConfig, EngineCoreClient, SamplingParams
from longserve.config import ServeConfig
from longserve.engine.protocol import AbortRequest, EngineRequest, encoder
from longserve.serve.stream_protocol import Accepted, Deltas, Ping, Rejected, from_worker_decoder
from longserve.serve.worker import ModelWorker

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[EngineCoreClient]:
    config = EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4)
    client = asyncio.run(EngineCoreClient.create(config, in_process=True))
    yield client
    client.shutdown()


class FrontEnd:
    """A DEALER socket speaking the stream protocol, as an API server does."""

    def __init__(self, address: str) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.connect(address)
        self.encode = encoder().encode
        self.decode = from_worker_decoder().decode

    async def send(self, message) -> None:
        await self.socket.send(self.encode(message))

    async def receive(self, timeout: float = 10.0):
        return self.decode(await asyncio.wait_for(self.socket.recv(), timeout))

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


async def _tokens_until_finished(front: FrontEnd, request_ids: set[str]) -> tuple[dict[str, list[int]], int]:
    tokens: dict[str, list[int]] = {r: [] for r in request_ids}
    frames, open_ids = 0, set(request_ids)
    while open_ids:
        message = await front.receive()
        if isinstance(message, Ping | Accepted):
            continue
        assert isinstance(message, Deltas), message
        frames += 1
        for delta in message.deltas:
            if delta.request_id not in tokens:
                continue  # an aborted request's last delta
            for seq in delta.seqs:
                tokens[delta.request_id].extend(seq.token_ids)
            if delta.finished:
                open_ids.discard(delta.request_id)
    return tokens, frames


def _worker(engine: EngineCoreClient, **serve_options) -> ModelWorker:
    return ModelWorker(engine, ServeConfig(controller_address="", **serve_options), "tiny")


def test_deltas_equal_offline_greedy_and_come_one_frame_per_step(engine, tiny_llama_dir) -> None:
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    expected = [
        o.outputs[0].token_ids for o in LLM(tiny_llama_dir, kv_cache_memory_mb=4).generate(prompts, GREEDY)
    ]

    async def main():
        worker = _worker(engine)
        await worker.start()
        front = FrontEnd(worker.stream_server.address)
        try:
            for i, prompt in enumerate(prompts):
                await front.send(EngineRequest(f"r{i}", prompt, GREEDY))
            return await _tokens_until_finished(front, {f"r{i}" for i in range(3)}), worker.in_flight
        finally:
            front.close()
            await worker.stop()

    (tokens, frames), in_flight = asyncio.run(main())
    assert [tokens[f"r{i}"] for i in range(3)] == expected
    assert frames <= 8 + 2  # one frame per engine step, not one per request per step
    assert in_flight == 0


def test_a_full_worker_rejects_with_429_and_an_abort_frees_the_slot(engine) -> None:
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        worker = _worker(engine, worker_concurrency=1, max_queue_len=0)
        await worker.start()
        front = FrontEnd(worker.stream_server.address)
        try:
            await front.send(EngineRequest("first", [5, 6, 7], long))
            assert await front.receive() == Accepted("first")
            await front.send(EngineRequest("second", [5, 6, 7], GREEDY))
            rejected = None
            while rejected is None:
                message = await front.receive()
                rejected = message if isinstance(message, Rejected) else None
            await front.send(AbortRequest("first"))
            while worker.in_flight:
                await asyncio.sleep(0.01)
            await front.send(EngineRequest("third", [5, 6, 7], GREEDY))
            tokens, _ = await _tokens_until_finished(front, {"third"})
            return rejected, tokens
        finally:
            front.close()
            await worker.stop()

    rejected, tokens = asyncio.run(main())
    assert rejected.request_id == "second" and rejected.status == 429
    assert len(tokens["third"]) == 8


def test_an_abort_right_behind_its_request_frees_the_slot(engine) -> None:
    """The abort is handled before the request's task first runs (both frames read in one go): the slot still
    frees, or a drain would wait for it for ever."""
    from longserve.serve.worker_stream import _Peer

    async def main():
        worker = _worker(engine)
        await worker.start()
        try:
            server, peer = worker.stream_server, _Peer(b"front")
            for i in range(5):
                server._admit(peer, EngineRequest(f"r{i}", [5, 6, 7], GREEDY))
                server._abort(peer, AbortRequest(f"r{i}"))  # no await in between: the task has not started
            deadline = time.monotonic() + 10
            while worker.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return worker.in_flight, peer.requests
        finally:
            await worker.stop()

    assert asyncio.run(main()) == (0, {})


def test_a_silent_front_end_has_its_requests_aborted(engine, monkeypatch) -> None:
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    step = engine.engine.step

    def slow_step():  # 300 tokens take seconds: far longer than the peer timeout
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine.engine, "step", slow_step)

    async def main():
        worker = _worker(engine, worker_stream_keepalive_s=0.1, worker_stream_timeout_s=0.5)
        await worker.start()
        front = FrontEnd(worker.stream_server.address)
        try:
            await front.send(EngineRequest("orphan", [5, 6, 7], long))
            assert await front.receive() == Accepted("orphan")
            for _ in range(100):  # the front end says nothing more: gone, as far as the worker can tell
                if worker.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            return worker.in_flight, worker.num_aborted
        finally:
            front.close()
            await worker.stop()

    in_flight, aborted = asyncio.run(main())
    assert in_flight == 0 and aborted == 1


def test_a_malformed_frame_is_dropped_and_the_stream_goes_on(engine) -> None:
    async def main():
        worker = _worker(engine)
        await worker.start()
        front = FrontEnd(worker.stream_server.address)
        try:
            await front.socket.send(msgspec.msgpack.encode(["nonsense", 1]))
            await front.send(EngineRequest("after", [5, 6, 7], GREEDY))
            return await _tokens_until_finished(front, {"after"})
        finally:
            front.close()
            await worker.stop()

    tokens, _ = asyncio.run(main())
    assert len(tokens["after"]) == 8
