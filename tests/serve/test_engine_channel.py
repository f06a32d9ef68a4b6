"""The API server's channel to a worker against a bare ZMQ ROUTER standing in for the worker: deltas reach
their request's sink, and nothing waits forever on a worker that never accepts, goes silent or dies."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from longserve.engine.protocol import EngineRequest, RequestDelta, SequenceDelta, encoder
from longserve.engine.sampling_params import SamplingParams
from longserve.serve.engine_channel import EngineChannel, NotAccepted
from longserve.serve.stream_protocol import Accepted, Deltas, to_worker_decoder
from longserve.serve.worker_protocol import ErrorInfo

TIMEOUT_S = 1.0


class FakeWorker:
    """A ROUTER on loopback that answers as a test tells it to."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.peer: bytes | None = None

    async def receive(self):
        self.peer, payload = await self.socket.recv_multipart()
        return to_worker_decoder().decode(payload)

    async def send(self, message) -> None:
        await self.socket.send_multipart([self.peer, encoder().encode(message)])


def _request(request_id: str) -> EngineRequest:
    return EngineRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4))


async def _with_channel(test) -> None:
    context = zmq.asyncio.Context()
    worker = FakeWorker(context)
    closed: list[tuple[str, bool]] = []
    channel = EngineChannel(
        context,
        "http://w",
        worker.address,
        TIMEOUT_S,
        0.1,
        lambda c, why, frozen: closed.append((why, frozen)),
    )
    try:
        await test(worker, channel, closed)
    finally:
        channel.close()
        worker.socket.close(linger=0)
        context.term()


def test_deltas_reach_the_sink_of_their_request() -> None:
    async def test(worker: FakeWorker, channel: EngineChannel, closed: list) -> None:
        got: list[RequestDelta | ErrorInfo] = []

        async def serve() -> None:
            request = await worker.receive()
            await worker.send(Accepted(request.request_id))
            delta = RequestDelta(request.request_id, [SequenceDelta(0, [7], None, "length")], True)
            await worker.send(Deltas([delta]))

        server = asyncio.create_task(serve())
        await channel.submit(_request("r1"), got.append)
        await server
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert [d.seqs[0].token_ids for d in got] == [[7]] and channel.open_requests == 0

    asyncio.run(_with_channel(test))


def test_a_worker_that_never_accepts_times_out() -> None:
    async def test(worker: FakeWorker, channel: EngineChannel, closed: list) -> None:
        start = time.monotonic()
        with pytest.raises(NotAccepted) as caught:
            await channel.submit(_request("r1"), lambda item: None)
        assert caught.value.timed_out and caught.value.info.code == "worker_failed"
        assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 1

    asyncio.run(_with_channel(test))


def test_a_silent_worker_fails_open_requests_past_the_timeout() -> None:
    async def test(worker: FakeWorker, channel: EngineChannel, closed: list) -> None:
        got: list = []

        async def accept() -> None:
            await worker.send(Accepted((await worker.receive()).request_id))

        server = asyncio.create_task(accept())
        await channel.submit(_request("r1"), got.append)
        await server
        start = time.monotonic()
        while not got and time.monotonic() - start < TIMEOUT_S + 2:
            await asyncio.sleep(0.02)
        assert len(got) == 1 and isinstance(got[0], ErrorInfo) and got[0].status == 503
        assert "read timeout" in got[0].message and closed and closed[0][1]  # reported as frozen

    asyncio.run(_with_channel(test))


def test_a_worker_that_dies_fails_open_requests_at_once() -> None:
    async def test(worker: FakeWorker, channel: EngineChannel, closed: list) -> None:
        got: list = []

        async def accept() -> None:
            await worker.send(Accepted((await worker.receive()).request_id))

        server = asyncio.create_task(accept())
        await channel.submit(_request("r1"), got.append)
        await server
        worker.socket.close(linger=0)  # the process died: its end of the connection drops
        start = time.monotonic()
        while not got and time.monotonic() - start < TIMEOUT_S:
            await asyncio.sleep(0.01)
        assert len(got) == 1 and got[0].code == "worker_failed" and "lost" in got[0].message
        assert time.monotonic() - start < TIMEOUT_S / 2 and closed and not closed[0][1]

    asyncio.run(_with_channel(test))
