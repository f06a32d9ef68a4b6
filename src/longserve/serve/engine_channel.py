"""The API server's end of one worker's front-end stream (``stream_protocol``): a ZMQ DEALER that carries every
request this process sends that worker, and routes the worker's frames back to each request's sink.

Nothing waits forever on a worker: ``submit`` gives up when the worker does not accept within the stream
timeout; a worker silent past it while requests are open (frozen), or whose connection drops (died), fails
every open request with 503 ``worker_failed``, and the channel closes (the next request reconnects, having
asked the worker again where its stream listens, since a restarted worker listens on a new port).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from longserve.engine.protocol import AbortRequest, EngineRequest, RequestDelta, encoder
from longserve.serve.stream_protocol import (
    Accepted,
    Deltas,
    Failed,
    Ping,
    Rejected,
    from_worker_decoder,
)
from longserve.serve.worker_protocol import ErrorInfo

log = logging.getLogger(__name__)

# What a request's sink receives: its deltas in order, then possibly one ErrorInfo (the request failed).
Sink = Callable[[RequestDelta | ErrorInfo], None]


class NotAccepted(Exception):
    """The worker refused the request (``info``: its answer) or never answered (``timed_out``)."""

    def __init__(self, info: ErrorInfo, timed_out: bool = False) -> None:
        super().__init__(info.message)
        self.info = info
        self.timed_out = timed_out


class EngineChannel:
    """One worker's stream for this process. ``on_close(channel, reason, frozen)`` runs once when it closes."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        worker_address: str,
        stream_address: str,
        timeout_s: float,
        keepalive_s: float,
        on_close: Callable[[EngineChannel, str, bool], None],
    ) -> None:
        self.worker_address = worker_address
        self.stream_address = stream_address
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._on_close = on_close
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socket.connect(stream_address)
        self._sinks: dict[str, Sink] = {}
        self._pending: dict[str, asyncio.Future[ErrorInfo | None]] = {}  # waiting for Accepted/Rejected
        self._last_heard = time.monotonic()
        self._encode = encoder().encode
        self._decode = from_worker_decoder().decode
        self.closed = False
        self._tasks = [
            asyncio.create_task(self._receive(), name=f"channel-receive-{worker_address}"),
            asyncio.create_task(self._watch(), name=f"channel-watch-{worker_address}"),
            asyncio.create_task(self._watch_disconnect(), name=f"channel-monitor-{worker_address}"),
        ]

    @property
    def open_requests(self) -> int:
        return len(self._sinks)

    async def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Send ``request``; return once the worker accepted it (its deltas then go to ``sink``).

        Raises ``NotAccepted`` when the worker refuses it or says nothing within the timeout.
        """
        if self.closed:
            raise NotAccepted(_worker_failed(f"worker {self.worker_address} connection is closed"))
        request_id = request.request_id
        answer = self._pending[request_id] = asyncio.get_running_loop().create_future()
        self._sinks[request_id] = sink
        if len(self._sinks) == 1:
            self._last_heard = time.monotonic()  # the silence that counts starts with the first open request
        try:
            self._send(request)
            async with asyncio.timeout(self.timeout_s):
                refused = await answer
        except TimeoutError:
            self._sinks.pop(request_id, None)
            self._send(AbortRequest(request_id))  # if it ever arrives, it must not run
            raise NotAccepted(
                _worker_failed(f"worker {self.worker_address} did not accept the request in time"), True
            ) from None
        except BaseException:
            self.abort(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
        if refused is not None:
            self._sinks.pop(request_id, None)
            raise NotAccepted(refused)

    def abort(self, request_id: str, seq_index: int | None = None) -> None:
        """Stop one completion (a stop string matched) or the whole request (its sink hears nothing more)."""
        if seq_index is None and self._sinks.pop(request_id, None) is None:
            return
        if not self.closed:
            self._send(AbortRequest(request_id, seq_index))

    def close(self, reason: str | None = None, frozen: bool = False) -> None:
        """Fail every open request with ``reason`` (if given) and shut the socket; safe to call twice.
        ``frozen``: the worker stopped answering (``on_close`` may report it)."""
        if self.closed:
            return
        self.closed = True
        sinks, self._sinks = self._sinks, {}
        info = _worker_failed(reason or "the API server is closing the worker's stream")
        for future in self._pending.values():
            if not future.done():
                future.set_result(info)
        for sink in sinks.values():
            sink(info)
        for task in self._tasks:
            task.cancel()
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._on_close(self, reason or "closed", frozen)

    def _send(self, message: EngineRequest | AbortRequest | Ping) -> None:
        # The DEALER queues while (re)connecting; a worker that never reads is caught by the watchdog.
        self._socket.send(self._encode(message), flags=zmq.NOBLOCK)

    async def _receive(self) -> None:
        while True:
            payload = await self._socket.recv()
            self._last_heard = time.monotonic()
            try:
                message = self._decode(payload)
            except msgspec.DecodeError:
                log.warning("dropped a malformed frame from worker %s", self.worker_address)
                continue
            if isinstance(message, Deltas):
                sinks = self._sinks
                for delta in message.deltas:
                    sink = sinks.get(delta.request_id)
                    if sink is None:
                        continue  # aborted here meanwhile
                    if delta.finished:
                        del sinks[delta.request_id]
                    sink(delta)
            elif isinstance(message, Accepted):
                self._answer(message.request_id, None)
            elif isinstance(message, Rejected):
                info = ErrorInfo(
                    message=message.message,
                    type=message.error_type,
                    param=message.param,
                    code=message.code,
                    status=message.status,
                )
                self._answer(message.request_id, info)
            elif isinstance(message, Failed):
                sink = self._sinks.pop(message.request_id, None)
                if sink is not None:
                    error_type = "server_error" if message.status >= 500 else "invalid_request_error"
                    info = ErrorInfo(
                        message=message.message, type=error_type, code=message.code, status=message.status
                    )
                    sink(info)

    def _answer(self, request_id: str, refused: ErrorInfo | None) -> None:
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(refused)

    async def _watch(self) -> None:
        """Ping the worker while requests are open; give up on it when it is silent past the timeout."""
        while True:
            await asyncio.sleep(min(self.keepalive_s, self.timeout_s / 4))
            if not self._sinks:
                continue
            silent = time.monotonic() - self._last_heard
            if silent > self.timeout_s:
                log.warning("worker %s silent for %.1f s: failing its streams", self.worker_address, silent)
                self.close(
                    f"worker {self.worker_address} went silent past the read timeout ({self.timeout_s:g} s)",
                    frozen=True,
                )
                return
            self._send(Ping())

    async def _watch_disconnect(self) -> None:
        while True:
            frames = await self._monitor.recv_multipart()
            if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
                # Alarming only with requests open: a worker stopping cleanly drops idle connections too.
                level = logging.WARNING if self._sinks else logging.INFO
                log.log(level, "worker %s dropped its stream connection", self.worker_address)
                self.close(f"the connection to worker {self.worker_address} was lost")
                return


def _worker_failed(message: str) -> ErrorInfo:
    return ErrorInfo(message=message, type="server_error", code="worker_failed", status=503)
