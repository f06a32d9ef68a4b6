"""EngineCoreClient: the async face of an engine core process (``core_process``), as AsyncEngine is of an
engine thread — the worker uses either through the same methods.

The client tokenizes and validates requests itself (with the core's limits, so a bad request fails before
anything is sent), sends them over ZMQ, and rebuilds each request's cumulative ``RequestOutput`` from the
core's per-step deltas. If the core process dies, its requests end with ``RequestFailed`` within a poll
interval and the client starts a new core; requests arriving meanwhile get ``EngineShutDown`` (a 503 from
the worker) until the new core is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from longserve.config import EngineConfig
from longserve.engine.async_engine import EngineShutDown, RequestFailed
from longserve.engine.core_messages import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    CoreReady,
    EmbedCall,
    EmbedDone,
    EngineStats,
    OutputDelta,
    Shutdown,
    StepOutputs,
    encoder,
    from_core_decoder,
)
from longserve.engine.engine import CacheBusyError
from longserve.engine.outputs import CompletionOutput, RequestOutput
from longserve.engine.request import Request, RequestLimits, build_request
from longserve.engine.sampling_params import SamplingParams
from longserve.loading.errors import ModelLoadError

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.2  # how often the client checks that the core process is alive
MAX_RESTARTS = 3  # in a row without a request finishing in between; then the client stops


@dataclass
class _Stream:
    """One request's cumulative state, rebuilt from deltas, and the queue its caller reads."""

    request: Request
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    stop_reasons: list[int | str | None] = field(default_factory=list)
    prompt_logprobs: list | None = None

    def __post_init__(self) -> None:
        n = self.request.params.n
        self.texts, self.token_ids, self.logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        self.finish_reasons, self.stop_reasons = [None] * n, [None] * n

    def apply(self, delta: OutputDelta) -> RequestOutput:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        news = {c.index: c for c in delta.completions}
        completions = []
        for i in range(self.request.params.n):
            c = news.get(i)
            if c is not None:
                self.texts[i] += c.text
                self.token_ids[i].extend(c.token_ids)
                if c.logprobs is not None:
                    self.logprobs[i].extend(c.logprobs)
                self.finish_reasons[i], self.stop_reasons[i] = c.finish_reason, c.stop_reason
            wants_logprobs = self.request.params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index=i,
                    text=self.texts[i],
                    token_ids=self.token_ids[i],
                    delta_text=c.text if c else "",
                    delta_token_ids=c.token_ids if c else [],
                    logprobs=self.logprobs[i] if wants_logprobs else None,
                    delta_logprobs=((c.logprobs or []) if c else []) if wants_logprobs else None,
                    finish_reason=self.finish_reasons[i],
                    stop_reason=self.stop_reasons[i],
                )
            )
        request = self.request
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            finished=delta.finished,
            prompt_logprobs=self.prompt_logprobs if request.params.prompt_logprobs is not None else None,
            error=delta.error,
            num_cached_tokens=delta.num_cached_tokens,
        )


class EngineCoreClient:
    """``async for out in client.stream(request)`` streams one request from the engine core process."""

    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.limits: RequestLimits
        self.quantization: str | None = None
        self._stats = EngineStats()
        self._streams: dict[str, _Stream] = {}
        self._embeds: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._encode = encoder().encode
        self._decode = from_core_decoder().decode
        self._dir = tempfile.TemporaryDirectory(prefix="longserve-core-")
        self._context = zmq.asyncio.Context()  # the socket the outputs arrive on is awaited
        self._send_context = (
            zmq.Context()
        )  # sends never wait: a full or peerless queue means the core is down
        self._process: subprocess.Popen | None = None
        self._to_core: zmq.Socket | None = None
        self._from_core: zmq.asyncio.Socket | None = None
        self._ready = False
        self._stopping = False
        self._restarts = 0
        # Why the core is gone for good (it died MAX_RESTARTS times in a row); None while it can serve or
        # restart. The worker's launcher watches it and stops the worker.
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._generation = itertools.count()

    @classmethod
    async def create(cls, config: EngineConfig) -> EngineCoreClient:
        """Start the core process and wait until its engine is built; raises what building it raised."""
        from longserve.loading.checkpoint import load_checkpoint

        # The tokenizer loads here while the core loads the model: chat templates and token counts need it.
        client = cls(config, None)
        started, tokenizer = await asyncio.gather(
            client._start_core(), asyncio.to_thread(load_checkpoint, config.model), return_exceptions=True
        )
        failure = next((r for r in (started, tokenizer) if isinstance(r, BaseException)), None)
        if failure is not None:  # the core's own report first: it says why the engine could not be built
            await client.ashutdown()
            raise failure
        client.tokenizer = tokenizer.tokenizer
        client._tasks.append(asyncio.create_task(client._watch(), name="engine-core-watch"))
        return client

    # ---- the core process -----------------------------------------------------------------------------------

    async def _start_core(self) -> None:
        generation = next(self._generation)
        inbox = f"ipc://{Path(self._dir.name) / f'in-{generation}'}"
        outbox = f"ipc://{Path(self._dir.name) / f'out-{generation}'}"
        self._to_core = self._send_context.socket(zmq.PUSH)
        self._to_core.bind(inbox)
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.bind(outbox)
        level = logging.getLogger("longserve").getEffectiveLevel()
        command = [
            sys.executable,
            "-m",
            "longserve.engine.core_process",
            "--inbox",
            inbox,
            "--outbox",
            outbox,
        ]
        self._process = subprocess.Popen([*command, "--log-level", str(level)], stdin=subprocess.PIPE)
        self._process.stdin.write(msgspec.json.encode(self.config))
        self._process.stdin.close()
        first = asyncio.ensure_future(self._from_core.recv())
        while not first.done():
            await asyncio.wait([first], timeout=WATCH_INTERVAL_S)
            if not first.done() and self._process.poll() is not None:
                first.cancel()
                raise RuntimeError(f"the engine core process exited with code {self._process.returncode}")
        message = self._decode(first.result())
        if isinstance(message, CoreFailed):
            error = {"ModelLoadError": ModelLoadError, "ValueError": ValueError}.get(message.error_type)
            raise (error or RuntimeError)(message.message)
        assert isinstance(message, CoreReady)
        self.limits, self.quantization = message.limits, message.quantization
        self._tasks.append(asyncio.create_task(self._read(self._from_core), name="engine-core-read"))
        self._ready = True

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            message = self._decode(await socket.recv())
            if isinstance(message, StepOutputs):
                self._stats = message.stats
                for delta in message.outputs:
                    self._deliver(delta)
            elif isinstance(message, EmbedDone):
                self._embed_done(message)

    def _deliver(self, delta: OutputDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:
            return  # its caller is gone (aborted)
        if delta.finished:
            self._restarts = 0
        output = stream.apply(delta)
        stream.queue.put_nowait(output if output.error is None else RequestFailed(output.error))

    def _embed_done(self, message: EmbedDone) -> None:
        future = self._embeds.pop(message.call_id, None)
        if future is None or future.done():
            return
        if message.error_type is None:
            future.set_result(message.embeddings)
        else:
            error = {"ValueError": ValueError, "CacheBusyError": CacheBusyError}.get(message.error_type)
            future.set_exception((error or RuntimeError)(message.message))

    async def _watch(self) -> None:
        """Fail the requests of a core that died, then start another (at most MAX_RESTARTS in a row)."""
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self._stopping or self._process is None or self._process.poll() is None:
                continue
            code = self._process.returncode
            self._ready = False
            log.error(
                "the engine core process died (exit code %s): failing its %d requests",
                code,
                len(self._streams),
            )
            self._fail_everything(RequestFailed(f"the engine core process died (exit code {code})"))
            self._close_sockets()
            if self._restarts >= MAX_RESTARTS:
                self.failure = (
                    f"the engine core died {self._restarts + 1} times in a row (last exit code {code})"
                )
                log.error("%s: not restarting it", self.failure)
                self._stopping = True
                return
            self._restarts += 1
            try:
                await self._start_core()
                log.warning("engine core restarted")
            except Exception:
                log.exception("could not restart the engine core")

    def _fail_everything(self, error: Exception) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        self._streams.clear()
        for future in self._embeds.values():
            if not future.done():
                future.set_exception(error)
        self._embeds.clear()

    def _close_sockets(self) -> None:
        for task in self._tasks:
            if task.get_name() == "engine-core-read":
                task.cancel()
        self._tasks = [t for t in self._tasks if t.get_name() != "engine-core-read"]
        for socket in (self._to_core, self._from_core):
            if socket is not None:
                socket.close(linger=0)
        self._to_core = self._from_core = None

    def _send(self, message) -> None:
        if not self._ready or self._to_core is None:
            raise EngineShutDown("the engine core is not running (restarting or shut down)")
        try:
            self._to_core.send(self._encode(message), flags=zmq.NOBLOCK)
        except zmq.Again as exc:
            raise EngineShutDown("the engine core is not taking requests (gone or stuck)") from exc

    # ---- the AsyncEngine surface ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Running and waiting sequences and KV cache usage, as of the core's last step."""
        return self._stats

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

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
            build_request,
            self.tokenizer,
            self.limits,
            request_id,
            prompt,
            params,
            add_special_tokens=add_special_tokens,
        )

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        request = await self.build_request(prompt, params, request_id, add_special_tokens=add_special_tokens)
        async for output in self.stream(request):
            yield output

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Send a built request and stream its outputs; ``RequestFailed`` if the core ends it with an error."""
        request_id = request.request_id
        if self._stopping:
            raise EngineShutDown("the engine is shut down")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        stream = _Stream(request)
        self._send(AddRequest(request_id, request.prompt, request.prompt_token_ids, request.params))
        self._streams[request_id] = stream
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                with contextlib.suppress(EngineShutDown, zmq.ZMQError):
                    self._send(AbortRequest(request_id))

    async def embed(self, prompts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Each prompt's embedding (pooled as ``limits.pooling`` says), computed in the core between steps."""
        tokenizer = self.tokenizer

        def tokenize() -> list[list[int]]:
            return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

        token_lists = await asyncio.to_thread(tokenize)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._embeds[call_id] = future
        try:
            self._send(EmbedCall(call_id, token_lists))
            embeddings = await future
        finally:
            self._embeds.pop(call_id, None)
        return embeddings, sum(len(t) for t in token_lists)

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineShutDown, zmq.ZMQError):
            self._send(AbortRequest(request_id))

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop taking work, end every open stream with ``EngineShutDown(reason)`` and tell the core to stop."""
        if self._stopping and not self._ready:
            return
        self._stopping = True
        with contextlib.suppress(EngineShutDown, zmq.ZMQError):
            self._send(Shutdown())
        self._ready = False
        self._fail_everything(EngineShutDown(reason))

    async def ashutdown(self, timeout: float = 10.0) -> None:
        """``begin_shutdown``, wait for the core process to exit (killed after ``timeout``), release sockets."""
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        process = self._process
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                log.warning("the engine core did not stop in %.0f s: killing it", timeout)
                process.kill()
                await asyncio.to_thread(process.wait, 5)
        self._close_sockets()
        self._context.term()
        self._send_context.term()
        self._dir.cleanup()
