"""One client request's generations: one engine request per prompt, tokenized here (``frontend``), started on
workers' channels concurrently (with failover), their deltas turned into ``WorkerStreamChunk``s (text,
stop strings, logprob token texts) and merged into one sequence of ``(prompt index, chunk)``; closed together.

The request's lifetime is watched too: when the client disconnects, the merged sequence ends and every engine
request is aborted, which frees its KV cache. The same happens, with an error the client sees, when the
request runs past ``request_timeout_s`` or the API server is stopping.

``start()`` returns once every worker has accepted its request, so that a rejection still becomes an HTTP
error status; after that, an error can only travel inside the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from longserve.engine.protocol import EngineRequest, RequestDelta
from longserve.serve.engine_channel import EngineChannel
from longserve.serve.errors import APIError, ClientDisconnected, service_unavailable
from longserve.serve.frontend import ModelFrontend
from longserve.serve.metrics import RequestRecorder
from longserve.serve.prefix_routing import prompt_fingerprint
from longserve.serve.stream_chunks import ChunkBuilder
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import ErrorInfo, WorkerGenerateRequest, WorkerStreamChunk

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """A generation failed after it started (its worker died or froze, or its engine failed it)."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclass
class _Item:
    prompt: int  # -1 for the watchers: the client disconnected, or (with ``error``) timeout or shutdown
    delta: RequestDelta | None = None
    error: APIError | None = None  # the request failed; before it was accepted this is the request's answer
    accepted: bool = False  # a worker accepted this prompt's request
    in_stream: bool = False  # a delta or error from the accepted request (may overtake ``accepted``)


@dataclass
class _Stream:
    """One prompt's engine request, where it runs, and its text so far."""

    request: EngineRequest
    builder: ChunkBuilder
    channel: EngineChannel | None = None
    finished: bool = False  # the engine sent its final delta (or it failed): nothing to abort


class Generation:
    """Merged generations of one request. Use as ``async with`` (or call ``aclose()``) after ``start()``."""

    def __init__(
        self,
        upstream: Upstream,
        request: Request,
        model: str,
        payloads: list[WorkerGenerateRequest],
        recorder: RequestRecorder,
        frontend: ModelFrontend | None = None,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.model = model
        self.payloads = payloads
        self.recorder = recorder
        self.frontend = frontend  # the model's, if the caller already has it (chat rendered its template)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: list[_Stream] = []
        self._early: deque[_Item] = deque()
        self._done: set[int] = set()  # prompts whose last chunk was yielded
        self._closed = False

    async def start(self) -> None:
        """Tokenize every prompt and start it on a worker; return once each was accepted. Raises the first
        rejection as ``APIError`` (or ``ClientDisconnected``) and closes everything then."""
        self.recorder.metrics.in_flight.inc()
        self._tasks.append(asyncio.create_task(self._watch_disconnect(), name="disconnect-watch"))
        self._tasks.append(asyncio.create_task(self._watch_stop(), name="stop-watch"))
        if self.upstream.request_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watch_deadline(), name="deadline-watch"))
        try:
            frontend = self.frontend or await self.upstream.frontend(self.model)
            for payload in self.payloads:
                request = await frontend.prepare(payload)
                self._streams.append(_Stream(request, ChunkBuilder(frontend.token_texts, request)))
            for i in range(len(self._streams)):
                self._tasks.append(asyncio.create_task(self._open(i), name=f"open-{i}"))
            accepted = 0
            while accepted < len(self._streams):
                item = await self._queue.get()
                if item.prompt < 0 and item.error is None:
                    raise ClientDisconnected()
                if item.in_stream:
                    self._early.append(item)  # before every prompt was accepted: events() replays it
                elif item.error is not None:
                    raise item.error
                else:
                    accepted += 1
        except BaseException:
            await self.aclose()
            raise

    async def events(self) -> AsyncIterator[tuple[int, WorkerStreamChunk]]:
        """Every chunk (each prompt's first one with its prompt fields) until all generations finished.

        Raises ``StreamBroken`` when one fails and ``ClientDisconnected`` when the client is gone.
        """
        while len(self._done) < len(self._streams):
            item = self._early.popleft() if self._early else await self._queue.get()
            if item.prompt < 0 and item.error is None:
                raise ClientDisconnected()
            if item.error is not None:
                if item.prompt >= 0:
                    self._streams[item.prompt].finished = True
                    self.recorder.on_stream_error(item.prompt)
                raise StreamBroken(item.error.info())
            stream = self._streams[item.prompt]
            builder, delta = stream.builder, item.delta
            stream.finished = delta.finished
            if builder.first:
                builder.first = False
                yield item.prompt, builder.prompt_chunk(delta)
            chunk = builder.chunk(delta)
            for index in builder.stopped:  # a stop string ended this completion: stop generating it
                stream.channel.abort(stream.request.request_id, index)
            if chunk is None:
                continue
            self.recorder.on_chunk(item.prompt, chunk)
            if chunk.finished:
                self._done.add(item.prompt)
                if not stream.finished:  # stop strings ended every completion before the engine did
                    stream.channel.abort(stream.request.request_id)
                    stream.finished = True
            yield item.prompt, chunk

    async def aclose(self) -> None:
        """Abort what still runs and cancel the watchers; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for stream in self._streams:
            if stream.channel is not None and not stream.finished:
                stream.channel.abort(stream.request.request_id)
        for task in self._tasks:
            task.cancel()
        self.recorder.metrics.in_flight.dec()
        if self._tasks:
            # Shielded, so that if our caller is cancelled meanwhile the openers still finish (and their
            # requests are aborted); the caller's cancellation propagates all the same.
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _open(self, prompt: int) -> None:
        stream, put = self._streams[prompt], self._queue.put_nowait

        def sink(item: RequestDelta | ErrorInfo) -> None:
            if isinstance(item, RequestDelta):
                put(_Item(prompt, delta=item, in_stream=True))
            else:
                put(_Item(prompt, error=APIError.from_info(item), in_stream=True))

        request = stream.request
        try:
            fingerprint = prompt_fingerprint(request.prompt_token_ids)  # steers cache_aware dispatch
            stream.channel = await self.upstream.open_stream(self.model, request, sink, fingerprint)
            if self._closed:  # accepted as the request was being closed
                stream.channel.abort(request.request_id)
                return
            put(_Item(prompt, accepted=True))
        except APIError as exc:
            put(_Item(prompt, error=exc))
        except Exception as exc:  # a bug on this path: logged with its traceback, and the client is told
            log.exception("starting request %s failed", request.request_id)
            put(_Item(prompt, error=APIError(f"internal error: {type(exc).__name__}", status=500)))

    async def _watch_stop(self) -> None:
        await self.upstream.stopping.wait()
        error = service_unavailable("the server is shutting down", code="server_shutting_down")
        self._queue.put_nowait(_Item(-1, error=error))

    async def _watch_deadline(self) -> None:
        timeout = self.upstream.request_timeout_s
        await asyncio.sleep(timeout)
        message = f"the request did not finish within the server's request timeout ({timeout:g} s)"
        self._queue.put_nowait(_Item(-1, error=APIError(message, status=504, code="request_timeout")))

    async def _watch_disconnect(self) -> None:
        # The body has been read, so the next ASGI message is the disconnect (or the response completing).
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self._queue.put_nowait(_Item(-1))
                return
