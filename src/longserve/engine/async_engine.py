"""AsyncEngine: the LLMEngine loop on its own thread, fed through a thread-safe queue, awaited from asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from longserve.config import EngineConfig
from longserve.distributed.launch import RankDiedError
from longserve.engine.core_messages import EngineStats
from longserve.engine.engine import LLMEngine
from longserve.engine.outputs import RequestOutput
from longserve.engine.request import Request, RequestLimits
from longserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (sampling, detokenizing, its forward pass, shutdown)."""


class EngineShutDown(RequestFailed):
    """The engine is stopping (or stopped): the request was cut short or never started; another may serve it."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an Exception that ends the stream


class AsyncEngine:
    """``async for out in engine.generate(prompt, params)`` streams one request; ``abort`` stops it.

    The event loop never runs a forward pass: the engine thread steps while work exists and sleeps on its
    inbox otherwise. Closing the async iterator early (a client gone) aborts the request, which frees its KV
    blocks at the next step.

    The engine thread also builds the engine. On the CPU, torch's OpenMP compute threads belong to the thread
    that first runs a parallel region. A model loaded on another thread leaves that thread's team behind, and
    the engine thread then steps with a second team that competes with the first (measured: int8 serving
    at 28 tok/s at c=1 instead of 49).
    """

    def __init__(self, build: Callable[[], LLMEngine]) -> None:
        self.engine: LLMEngine  # set by the engine thread before ``loaded`` completes
        self.loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._build = build
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def create(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model on the engine thread (the event loop stays responsive meanwhile); raises what the
        load raised."""
        engine = cls(lambda: LLMEngine(config))
        await asyncio.wrap_future(engine.loaded)
        return engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self.engine.limits

    @property
    def ready(self) -> bool:
        return not self._stopped.is_set()

    @property
    def failure(self) -> str | None:
        """Never set: a failed step fails its requests and the thread goes on (EngineCoreClient's can be)."""
        return None

    def stats(self) -> EngineStats:
        """Running and waiting sequences and KV cache usage. Read from the event loop while the engine thread
        steps: len() and a float are safe, and a value one step stale is fine for dispatch and metrics."""
        return self.engine.stats()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (deltas in ``delta_text``); the last one has ``finished`` set."""
        request = await self.build_request(prompt, params, request_id, add_special_tokens=add_special_tokens)
        async for output in self.stream(request):
            yield output

    async def build_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> Request:
        """Tokenize and validate off the event loop; a bad request raises ``ValueError`` here."""
        request_id = request_id or f"req-{next(self._ids)}"
        return await asyncio.to_thread(
            self.engine.build_request, request_id, prompt, params, add_special_tokens=add_special_tokens
        )

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue a built request and stream its outputs; ``RequestFailed`` if the engine ends it with an error."""
        request_id = request.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:  # with begin_shutdown's: a stream registered here is either failed there or refused
            if self._stopped.is_set():
                raise EngineShutDown("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine has already dropped the request
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def embed(self, prompts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Each prompt's embedding (pooled as the engine's ``pooling`` says), and the prompts' total token count.

        Tokenizing runs off the event loop; the forward passes run on the engine thread between steps, so they
        never race ``step()`` for the model or the KV cache. A bad input raises ``ValueError``.
        """
        tokenizer = self.engine.tokenizer

        def tokenize() -> list[list[int]]:
            return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

        token_lists = await asyncio.to_thread(tokenize)
        if self._stopped.is_set():
            raise EngineShutDown("the engine is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("embed", (token_lists, future)))
        embeddings = await asyncio.wrap_future(future)
        return embeddings, sum(len(t) for t in token_lists)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its KV blocks are freed."""
        self._inbox.put(("abort", request_id))

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop taking work and end every open stream with ``EngineShutDown(reason)``; returns at once, so it
        may run on an event loop. The engine thread leaves after the step it is in."""
        with self._lock:
            self._stopped.set()
            streams = list(self._streams.items())
        self._inbox.put(("stop", None))
        for _, stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineShutDown(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        """``begin_shutdown`` and wait for the engine thread (blocking: from async code use ``ashutdown``)."""
        self.begin_shutdown()
        self._thread.join(timeout=timeout)

    async def ashutdown(self, timeout: float = 10.0) -> None:
        """``shutdown`` without blocking the event loop while the engine thread finishes its step."""
        self.begin_shutdown()
        await asyncio.to_thread(self._thread.join, timeout)

    # ---- engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as exc:  # handed to create()'s caller, which raises it
            self.loaded.set_exception(exc)
            self._stopped.set()
            self._drain_inbox()
            return
        self.loaded.set_result(None)
        try:
            self._loop()
        finally:
            self._drain_inbox()
            self.engine.close()

    def _drain_inbox(self) -> None:
        """After stopping: whatever was still queued gets an answer, so no caller waits forever."""
        while True:
            try:
                command, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._deliver(payload.request_id, EngineShutDown("the engine is shut down"))
            elif command == "embed" and payload[1].set_running_or_notify_cancel():
                payload[1].set_exception(EngineShutDown("the engine is shut down"))

    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                command, payload = self._inbox.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                if command == "stop":
                    return  # what is still queued is answered by _drain_inbox
                self._handle(command, payload)
                try:
                    command, payload = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopped.is_set():
                return
            try:
                outputs = self.engine.step()
            except RankDiedError as exc:  # no step can run any more
                log.error("engine stopped: %s", exc)
                self._fail_all(exc)
                self.begin_shutdown(str(exc))
                return
            except (
                Exception
            ) as exc:  # step() isolates request failures; this is a bug in the scheduler itself
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for output in outputs:
                # A failed request's last output has no news for the caller, only the error.
                self._deliver(
                    output.request_id, output if output.error is None else RequestFailed(output.error)
                )

    def _handle(self, command: str, payload) -> None:
        if command == "add":
            try:
                self.engine.add_request(payload)
            except Exception as exc:
                self._deliver(payload.request_id, exc)
        elif command == "abort":
            self.engine.abort(payload)
        elif command == "embed":
            token_lists, future = payload
            if future.set_running_or_notify_cancel():  # False: the caller is gone, skip the work
                try:
                    future.set_result(self.engine.embed_batch(token_lists))
                except Exception as exc:
                    future.set_exception(exc)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RequestFailed(f"engine step failed: {exc!r}"))
