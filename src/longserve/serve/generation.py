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
import functools
import logging
import time
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
class _Stream:
    """One prompt's engine request, where it runs, and its text so far."""

    request: EngineRequest
    builder: ChunkBuilder
    channel: EngineChannel | None = None
    finished: bool = False  # the engine sent its final delta (or it failed): nothing to abort


class Generation:
    """Merged generations of one request. Use as ``async with`` (or call ``aclose()``) after ``start()``.

    Deltas wait in a mailbox, one merged delta per prompt: a reader slower than the engine gets everything
    that came meanwhile in one chunk, and the mailbox never holds more than one delta per prompt.
    """

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
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: list[_Stream] = []
        self._news: dict[int, RequestDelta] = {}  # prompt -> what arrived since the reader last looked
        self._broken: tuple[int, APIError] | None = None  # a started request failed (prompt, error)
        self._fatal: APIError | None = None  # a rejection, the deadline, or shutdown: the whole request ends
        self._disconnected = False
        self._accepted = 0
        self._last_news = time.monotonic()  # the last delta or keep-alive
        self._last_delta = time.monotonic()  # the last delta (the stall timeout counts from it)
        self._keepalive_due = False
        self._waiter: asyncio.Future[None] | None = None
        self._done: set[int] = set()  # prompts whose last chunk was yielded
        self._closed = False

    async def start(self) -> None:
        """Tokenize every prompt and start it on a worker; return once each was accepted. Raises the first
        rejection as ``APIError`` (or ``ClientDisconnected``) and closes everything then."""
        self.recorder.metrics.in_flight.inc()
        self._watch(self._watch_disconnect(), self._watch_stop(), self._watch_silence())
        if self.upstream.request_timeout_s is not None:
            self._watch(self._watch_deadline())
        if self.upstream.request_stall_timeout_s is not None:
            self._watch(self._watch_stall())
        try:
            frontend = self.frontend or await self.upstream.frontend(self.model)
            for payload in self.payloads:
                request = await frontend.prepare(payload)
                self._streams.append(_Stream(request, ChunkBuilder(frontend.token_texts, request)))
            self._watch(*(self._open(i) for i in range(len(self._streams))))
            while self._accepted < len(self._streams):
                if self._disconnected:
                    raise ClientDisconnected()
                if self._fatal is not None:
                    raise self._fatal
                await self._wait()
        except BaseException:
            await self.aclose()
            raise

    @property
    def prompt_token_counts(self) -> list[int]:
        """Each prompt's length in tokens (known once ``start`` returned)."""
        return [len(stream.request.prompt_token_ids) for stream in self._streams]

    async def events(self, keepalive: bool = False) -> AsyncIterator[tuple[int, WorkerStreamChunk] | None]:
        """Every chunk (each prompt's first one with its prompt fields) until all generations finished;
        with ``keepalive``, ``None`` too whenever nothing came for ``sse_keepalive_s``.

        Raises ``StreamBroken`` when one fails and ``ClientDisconnected`` when the client is gone.
        """
        while len(self._done) < len(self._streams):
            if self._disconnected:
                raise ClientDisconnected()
            if self._news:
                news, self._news = self._news, {}
                for prompt, delta in news.items():
                    for chunk in self._chunks(prompt, delta):
                        yield prompt, chunk
                continue
            failure = self._broken or ((-1, self._fatal) if self._fatal is not None else None)
            if failure is not None:
                prompt, error = failure
                if prompt >= 0:
                    self._streams[prompt].finished = True
                    self.recorder.on_stream_error(prompt)
                raise StreamBroken(error.info())
            if self._keepalive_due:
                self._keepalive_due = False
                if keepalive:
                    yield None
                continue
            await self._wait()

    def _chunks(self, prompt: int, delta: RequestDelta) -> list[WorkerStreamChunk]:
        stream = self._streams[prompt]
        builder = stream.builder
        stream.finished = delta.finished
        chunks = []
        if builder.first:
            builder.first = False
            chunks.append(builder.prompt_chunk(delta))
        chunk = builder.chunk(delta)
        for index in builder.stopped:  # a stop string ended this completion: stop generating it
            stream.channel.abort(stream.request.request_id, index)
        if chunk is not None:
            self.recorder.on_chunk(prompt, chunk)
            if chunk.finished:
                self._done.add(prompt)
                if not stream.finished:  # stop strings ended every completion before the engine did
                    stream.channel.abort(stream.request.request_id)
                    stream.finished = True
            chunks.append(chunk)
        return chunks

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

    def _watch(self, *coros) -> None:
        self._tasks.extend(asyncio.create_task(coro) for coro in coros)

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def _deliver(self, prompt: int, item: RequestDelta | ErrorInfo) -> None:
        """A sink: the channel's reader calls it with each delta of ``prompt``'s request, or its failure."""
        self._last_news = time.monotonic()
        if isinstance(item, ErrorInfo):
            if self._broken is None:
                self._broken = (prompt, APIError.from_info(item))
        else:
            self._last_delta = self._last_news
            pending = self._news.get(prompt)
            if pending is None:
                self._news[prompt] = item
            else:
                _merge(pending, item)
        self._notify()

    def _end(self, error: APIError | None) -> None:
        if error is None:
            self._disconnected = True
        elif self._fatal is None:
            self._fatal = error
        self._notify()

    async def _open(self, prompt: int) -> None:
        stream = self._streams[prompt]
        request = stream.request
        try:
            fingerprint = prompt_fingerprint(request.prompt_token_ids)  # steers cache_aware dispatch
            stream.channel = await self.upstream.open_stream(
                self.model, request, functools.partial(self._deliver, prompt), fingerprint
            )
            if self._closed:  # accepted as the request was being closed
                stream.channel.abort(request.request_id)
                return
            self._accepted += 1
            self._notify()
        except APIError as exc:
            self._end(exc)
        except Exception as exc:  # a bug on this path: logged with its traceback, and the client is told
            log.exception("starting request %s failed", request.request_id)
            self._end(APIError(f"internal error: {type(exc).__name__}", status=500))

    async def _watch_stop(self) -> None:
        await self.upstream.stopping.wait()
        self._end(service_unavailable("the server is shutting down", code="server_shutting_down"))

    async def _watch_deadline(self) -> None:
        timeout = self.upstream.request_timeout_s
        await asyncio.sleep(timeout)
        message = f"the request did not finish within the server's request timeout ({timeout:g} s)"
        self._end(APIError(message, status=504, code="request_timeout"))

    async def _watch_stall(self) -> None:
        timeout = self.upstream.request_stall_timeout_s
        while time.monotonic() - self._last_delta < timeout:
            await asyncio.sleep(max(0.0, self._last_delta + timeout - time.monotonic()) + 0.01)
        message = f"no new token within the server's request stall timeout ({timeout:g} s)"
        self._end(APIError(message, status=504, code="request_stalled"))

    async def _watch_silence(self) -> None:
        interval = self.upstream.sse_keepalive_s
        while True:
            await asyncio.sleep(max(0.0, self._last_news + interval - time.monotonic()))
            if time.monotonic() - self._last_news >= interval:
                self._last_news = time.monotonic()
                self._keepalive_due = True
                self._notify()

    async def _watch_disconnect(self) -> None:
        # The body has been read, so the next ASGI message is the disconnect (or the response completing).
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self._end(None)
                return


def _merge(pending: RequestDelta, later: RequestDelta) -> None:
    """Fold ``later`` into ``pending`` (both of one request, in order): one delta with everything new."""
    seqs = {seq.index: seq for seq in pending.seqs}
    for seq in later.seqs:
        into = seqs.get(seq.index)
        if into is None:
            pending.seqs.append(seq)
            continue
        into.token_ids.extend(seq.token_ids)
        if into.logprobs is not None and seq.logprobs is not None:
            into.logprobs.extend(seq.logprobs)
        into.finish_reason, into.stop_reason = seq.finish_reason, seq.stop_reason
    pending.finished = later.finished
    pending.error = pending.error or later.error
    if pending.prompt_logprobs is None:
        pending.prompt_logprobs = later.prompt_logprobs
    pending.num_cached_tokens = later.num_cached_tokens
