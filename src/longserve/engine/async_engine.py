"""AsyncEngine: the LLMEngine loop on its own thread, fed through a thread-safe queue, awaited from asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from longserve.config import EngineConfig
from longserve.engine.engine import LLMEngine, Request
from longserve.engine.outputs import RequestOutput
from longserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an Exception that ends the stream


class AsyncEngine:
    """``async for out in engine.generate(prompt, params)`` streams one request; ``abort`` stops it.

    The event loop never runs a forward pass: the engine thread steps while work exists and sleeps on its
    inbox otherwise. Closing the async iterator early (a client gone) aborts the request, which frees its KV
    blocks at the next step.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def create(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model in a worker thread so the event loop stays responsive meanwhile."""
        return cls(await asyncio.to_thread(LLMEngine, config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (deltas in ``delta_text``); the last one has ``finished`` set."""
        request_id = request_id or f"req-{next(self._ids)}"
        # Tokenization and validation run off the event loop; a bad request raises here, before queuing.
        request: Request = await asyncio.to_thread(
            self.engine.build_request, request_id, prompt, params, add_special_tokens=add_special_tokens
        )
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
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
        """Mean-pooled, L2-normalised embeddings of each prompt, and the prompts' total token count.

        Tokenizing runs off the event loop; the forward passes run on the engine thread between steps, so they
        never race ``step()`` for the model or the KV cache. A bad input raises ``ValueError``.
        """
        tokenizer = self.engine.tokenizer

        def tokenize() -> list[list[int]]:
            return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

        token_lists = await asyncio.to_thread(tokenize)
        if self._stopped.is_set():
            raise RuntimeError("engine is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("embed", (token_lists, future)))
        embeddings = await asyncio.wrap_future(future)
        return embeddings, sum(len(t) for t in token_lists)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its KV blocks are freed."""
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                command, payload = self._inbox.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command, payload)
                try:
                    command, payload = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopped.is_set():
                return
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not kill the loop: fail the running requests instead
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for output in outputs:
                self._deliver(output.request_id, output)

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
                    future.set_result([self.engine.embed(ids) for ids in token_lists])
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
            self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
