"""The worker's end of the front-end streams: a ZMQ ROUTER that takes requests from every API server, admits
them as the worker's HTTP endpoints do (429 when full), runs them on the engine core and sends each API server
one ``Deltas`` frame per engine step with the deltas of its own requests (see ``stream_protocol``).

The worker stays in the data path only to route frames: the deltas are the engine core's own objects,
re-framed per API server, never turned into text here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from longserve.engine.protocol import (
    AbortRequest,
    EngineRequest,
    EngineShutDown,
    RequestDelta,
    RequestFailed,
    encoder,
)
from longserve.serve.stream_protocol import (
    Accepted,
    Deltas,
    Failed,
    Ping,
    Rejected,
    to_worker_decoder,
)

log = logging.getLogger(__name__)
_SEND_HWM = 1_000_000  # frames queued per API server before ZMQ drops: bounded instead by the peer timeout


@dataclass
class _Peer:
    """One API server process: its requests here and when it was last heard."""

    identity: bytes
    requests: dict[str, asyncio.Task] = field(default_factory=dict)  # each holds a worker slot (or waits)
    running: set[str] = field(default_factory=set)  # of those, sent to the engine
    last_heard: float = field(default_factory=time.monotonic)
    outbox: list[RequestDelta] = field(default_factory=list)  # this step's deltas, sent together


class WorkerStreamServer:
    """Binds ``tcp://host:random port``; ``address`` is where API servers reach it (``advertised_host``, the
    host of the worker's own URL: a worker bound to 0.0.0.0 is reached by its name). ``start()`` serves,
    ``stop()`` closes."""

    def __init__(
        self, worker, host: str, advertised_host: str, keepalive_s: float, peer_timeout_s: float
    ) -> None:
        self.worker = worker  # serve.worker.ModelWorker: admission, counters and the engine
        self.keepalive_s = keepalive_s
        self.peer_timeout_s = peer_timeout_s
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.SNDHWM, _SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{advertised_host}:{port}"
        self._peers: dict[bytes, _Peer] = {}
        self._flush_scheduled = False
        self._encode = encoder().encode
        self._decode = to_worker_decoder().decode
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive(), name="worker-stream-receive"),
            asyncio.create_task(self._keepalive(), name="worker-stream-keepalive"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()

    # ---- receiving ------------------------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            identity, payload = await self._socket.recv_multipart()
            peer = self._peers.get(identity)
            if peer is None:
                peer = self._peers[identity] = _Peer(identity)
            peer.last_heard = time.monotonic()
            try:
                message = self._decode(payload)
            except msgspec.DecodeError:
                log.warning("dropped a malformed frame from an API server")
                continue
            if isinstance(message, EngineRequest):
                self._admit(peer, message)
            elif isinstance(message, AbortRequest):
                self._abort(peer, message)

    def _admit(self, peer: _Peer, request: EngineRequest) -> None:
        worker, request_id = self.worker, request.request_id
        worker.num_requests += 1
        rejected = worker.admission_error(request)
        if rejected is not None:
            worker.num_errors += 1
            info = rejected
            self._send(
                peer.identity,
                Rejected(request_id, info.message, info.type, info.param, info.code, info.status),
            )
            return
        worker.in_flight += 1
        task = peer.requests[request_id] = asyncio.create_task(
            self._run(peer, request), name=f"stream-{request_id}"
        )
        # Released when the task is done, however: a task cancelled before it first ran (an abort in the same
        # read as its request) never enters its body, so a finally there would leak the slot.
        task.add_done_callback(lambda _: self._release(peer, request_id))
        self._send(peer.identity, Accepted(request_id))

    def _release(self, peer: _Peer, request_id: str) -> None:
        peer.requests.pop(request_id, None)
        peer.running.discard(request_id)
        self.worker.in_flight -= 1

    async def _run(self, peer: _Peer, request: EngineRequest) -> None:
        """Hold one of the worker's slots for the request's whole life, as its HTTP endpoints do."""
        done = asyncio.get_running_loop().create_future()
        request_id = request.request_id

        def sink(item: RequestDelta | Exception) -> None:
            if isinstance(item, Exception):
                self._fail(peer, request_id, item)
            else:
                peer.outbox.append(item)
                self._schedule_flush()
            if (isinstance(item, Exception) or item.finished) and not done.done():
                done.set_result(None)

        async with self.worker.semaphore:
            peer.running.add(request_id)
            try:
                self.worker.engine.submit(request, sink)
            except (EngineShutDown, ValueError) as exc:
                sink(exc)
            await done

    def _abort(self, peer: _Peer, message: AbortRequest) -> None:
        task = peer.requests.get(message.request_id)
        if task is None:
            return  # finished meanwhile, or never here
        if message.seq_index is not None:
            self.worker.engine.abort(message.request_id, message.seq_index)  # a stop string matched there
            return
        self.worker.num_aborted += 1
        self._end(peer, message.request_id, task)

    def _end(self, peer: _Peer, request_id: str, task: asyncio.Task) -> None:
        """Abort a request this peer gave up on; its slot is freed when its task ends."""
        if request_id in peer.running:
            self.worker.engine.abort(request_id)
        task.cancel()

    def _fail(self, peer: _Peer, request_id: str, exc: Exception) -> None:
        self.worker.num_errors += 1
        if isinstance(exc, EngineShutDown):
            failed = Failed(request_id, str(exc), "worker_shutting_down", 503)
        elif isinstance(exc, RequestFailed) and exc.client_error:
            failed = Failed(request_id, str(exc), "invalid_grammar", 400)
        elif isinstance(exc, RequestFailed):
            failed = Failed(request_id, str(exc), "request_failed", 500)
        elif isinstance(exc, ValueError):  # the core refused it: a duplicate id or a limit that changed
            failed = Failed(request_id, str(exc), "invalid_request", 400)
        else:
            failed = Failed(request_id, f"{type(exc).__name__}: {exc}", "request_failed", 500)
        self._flush()  # deltas before the failure stay in order
        self._send(peer.identity, failed)

    # ---- sending --------------------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        # Every sink call of one engine step happens in one read of the core's frame; flushing after it sends
        # each API server one frame per step.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for peer in self._peers.values():
            if peer.outbox:
                deltas, peer.outbox = peer.outbox, []
                self._send(peer.identity, Deltas(deltas))

    def _send(self, identity: bytes, message) -> None:
        # Through the asyncio socket, never a plain shadow of it: a send makes libzmq process the socket's
        # queued commands, which can consume the edge of its (edge-triggered) descriptor for a frame that just
        # arrived; only the asyncio socket's send then re-checks and wakes the pending receive. A plain send
        # left the receive asleep with a request waiting (a worker that stopped answering, 1 run in ~10).
        # NOBLOCK: the future comes back done.
        sent = self._socket.send_multipart([identity, self._encode(message)], flags=zmq.NOBLOCK)
        error = sent.exception()
        if error is not None and not isinstance(error, zmq.Again):
            raise error  # (Again: the peer is gone or far behind; its timeout ends its requests)

    async def _keepalive(self) -> None:
        """Ping every API server with open requests; give up on those silent past the peer timeout."""
        while True:
            await asyncio.sleep(self.keepalive_s)
            now = time.monotonic()
            for peer in list(self._peers.values()):
                if now - peer.last_heard > self.peer_timeout_s:
                    if peer.requests:
                        log.warning(
                            "an API server went silent for %.0f s: aborting its %d requests",
                            now - peer.last_heard,
                            len(peer.requests),
                        )
                    self._drop_peer(peer)
                elif peer.requests:
                    self._send(peer.identity, Ping())

    def _drop_peer(self, peer: _Peer) -> None:
        self.worker.num_aborted += len(peer.requests)
        for request_id, task in list(peer.requests.items()):
            self._end(peer, request_id, task)
        self._peers.pop(peer.identity, None)
