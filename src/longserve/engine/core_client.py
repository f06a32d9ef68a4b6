"""EngineCoreClient: the one client of the one engine loop (``core_process``), awaited from asyncio.

The loop runs in a child process (the default: its forward passes never share the worker's GIL) or, with
``in_process=True``, on a thread of this process over inproc ZMQ sockets (tests, debugging, the terminal chat's
local mode); either way the same code drives ``LLMEngine``. Requests go in tokenized and validated
(``EngineRequest``); each comes back as the core's token deltas, handed to the request's sink as they arrive.

Where the core runs (process or thread) is ``core_handle``'s. A reader thread receives the core's frames and hands each step's deltas to the event loop that submitted each
request, one wake-up per loop per step; so one client serves any event loop (a worker's, a test's). The same
thread watches the core: if it dies, its requests end with ``RequestFailed`` within a poll interval and a new
core starts; requests arriving meanwhile get ``EngineShutDown`` (a 503 from the worker) until it is ready.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import zmq

from longserve.config import EngineConfig
from longserve.engine.core_handle import CoreHandle
from longserve.engine.outputs import OutputBuilder, RequestOutput
from longserve.engine.protocol import (
    AbortRequest,
    CacheBusyError,
    CoreFailed,
    CoreReady,
    EmbedCall,
    EmbedDone,
    EngineRequest,
    EngineShutDown,
    EngineStats,
    LoRACall,
    LoRADone,
    RequestDelta,
    RequestFailed,
    RequestLimits,
    Shutdown,
    StepOutputs,
    encoder,
    from_core_decoder,
)
from longserve.engine.sampling_params import SamplingParams
from longserve.loading.errors import ModelLoadError
from longserve.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.2  # how often the reader thread checks that the core is alive
MAX_RESTARTS = 3  # in a row without a request finishing in between; then the client stops

# Where a request's deltas go: a RequestDelta per step, or the exception that ends the request. Called on the
# event loop that submitted the request.
DeltaSink = Callable[[RequestDelta | Exception], None]
_Delivery = list[tuple[DeltaSink, RequestDelta | Exception]]


class EngineCoreClient:
    """``submit(request, sink)`` runs one request on the engine core; ``stream`` is the same as an iterator."""

    def __init__(
        self, config: EngineConfig, *, in_process: bool = False, stall_timeout_s: float | None = None
    ) -> None:
        self.config = config
        self.in_process = in_process
        # A core process with requests that sends nothing for this long is stalled: killed and replaced.
        self.stall_timeout_s = stall_timeout_s
        self.num_restarts = 0  # cores replaced (died or stalled)
        self.num_stalls = 0  # of those, stalled
        self._last_heard = time.monotonic()  # the core's last message (it sends one at least every second)
        self.tokenizer: Tokenizer | None = None  # the model's, as the core sent it when ready
        # In-process only: the LLMEngine the loop's thread drives, for tests and debugging to look inside
        # (racy to read while it steps); None for a core process.
        self.engine = None
        self.limits: RequestLimits
        self.quantization: str | None = None
        self._stats = EngineStats()
        self._lock = threading.Lock()  # guards the sinks, the embeds and the send socket
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, DeltaSink]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}  # embeddings and LoRA loads, by call id
        self._ids = itertools.count()
        self._encode = encoder().encode
        self._decode = from_core_decoder().decode
        self._dir = tempfile.TemporaryDirectory(prefix="longserve-core-")
        self._context = zmq.Context()  # an in-process core shares it: inproc addresses live in one context
        self._core: CoreHandle | None = None  # where the current core runs
        self._to_core: zmq.Socket | None = None
        self._from_core: zmq.Socket | None = None
        self._reader: threading.Thread | None = None
        self._ready = False
        self._stopping = False
        self._restarts = 0
        # Why the core is gone for good (it died MAX_RESTARTS times in a row); None while it can serve or
        # restart. The worker's launcher watches it and stops the worker.
        self.failure: str | None = None
        self._generation = itertools.count()

    @classmethod
    async def create(
        cls, config: EngineConfig, *, in_process: bool = False, stall_timeout_s: float | None = None
    ) -> EngineCoreClient:
        """Start the core and wait until its engine is built; raises what building it raised."""
        return await cls.launch(config, in_process=in_process, stall_timeout_s=stall_timeout_s).wait_started()

    @classmethod
    def launch(
        cls, config: EngineConfig, *, in_process: bool = False, stall_timeout_s: float | None = None
    ) -> EngineCoreClient:
        """Start the core and return at once: its model loads while the caller sets up the rest (``serve``
        launches it before importing the web stack); ``wait_started`` then waits for it."""
        client = cls(config, in_process=in_process, stall_timeout_s=stall_timeout_s)
        client._spawn_core()
        return client

    async def wait_started(self) -> EngineCoreClient:
        """Wait until the launched core's engine is built; raises what building it raised."""
        try:
            await asyncio.to_thread(self._await_core)
        except BaseException:
            await self.ashutdown()
            raise
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)
        self._reader.start()
        return self

    # ---- the core (on the reader thread, or launch()'s and wait_started()'s) --------------------------------

    def _start_core(self) -> None:
        self._spawn_core()
        self._await_core()

    def _spawn_core(self) -> None:
        generation = next(self._generation)
        if self.in_process:
            inbox, outbox = (
                f"inproc://core-in-{id(self)}-{generation}",
                f"inproc://core-out-{id(self)}-{generation}",
            )
        else:
            inbox = f"ipc://{Path(self._dir.name) / f'in-{generation}'}"
            outbox = f"ipc://{Path(self._dir.name) / f'out-{generation}'}"
        to_core = self._context.socket(zmq.PUSH)
        to_core.bind(inbox)
        from_core = self._context.socket(zmq.PULL)
        from_core.bind(outbox)
        with self._lock:
            self._to_core, self._from_core = to_core, from_core
        self._core = CoreHandle(
            self.config, inbox, outbox, in_process=self.in_process, context=self._context,
            on_built=lambda engine: setattr(self, "engine", engine),
        )  # fmt: skip

    def _await_core(self) -> None:
        from_core = self._from_core
        while not from_core.poll(int(WATCH_INTERVAL_S * 1000)):
            if self._exit_code() is not None:
                raise RuntimeError(f"the engine core exited with code {self._exit_code()}")
        message = self._decode(from_core.recv())
        if isinstance(message, CoreFailed):
            error = {"ModelLoadError": ModelLoadError, "ValueError": ValueError}.get(message.error_type)
            raise (error or RuntimeError)(message.message)
        assert isinstance(message, CoreReady)
        self.limits, self.quantization = message.limits, message.quantization
        self.tokenizer = Tokenizer.from_spec(message.tokenizer)
        self._ready = True

    def _exit_code(self) -> int | None:
        """None while the core runs; its exit code once it is gone (1 for a thread that ended)."""
        return None if self._core is None else self._core.exit_code()

    def _read(self) -> None:
        """The reader thread: deliver each step's deltas; restart a core that died."""
        while not self._stopping:
            socket = self._from_core
            try:
                has_message = socket is not None and socket.poll(int(WATCH_INTERVAL_S * 1000))
            except zmq.ZMQError:
                return  # closed by ashutdown
            if has_message:
                self._last_heard = time.monotonic()
                self._handle(self._decode(socket.recv()))
            elif not self._stopping and self._exit_code() is not None:
                self._replace_dead_core(f"the engine core process died (exit code {self._exit_code()})")
            elif not self._stopping and self._stalled():
                self._replace_stalled_core()

    def _handle(self, message) -> None:
        if isinstance(message, StepOutputs):
            self._stats = message.stats
            deliveries: dict[asyncio.AbstractEventLoop, _Delivery] = {}
            with self._lock:
                sinks = self._sinks
                for delta in message.outputs:
                    entry = sinks.get(delta.request_id)
                    if entry is None:
                        continue  # its caller is gone (aborted)
                    if delta.finished:
                        self._restarts = 0
                        del sinks[delta.request_id]
                    item = delta if delta.error is None else RequestFailed(delta.error, delta.client_error)
                    deliveries.setdefault(entry[0], []).append((entry[1], item))
            for loop, delivery in deliveries.items():
                _deliver(loop, delivery)
        elif isinstance(message, EmbedDone | LoRADone):
            with self._lock:
                future = self._calls.pop(message.call_id, None)
            if future is None or future.done():
                return
            if isinstance(message, LoRADone):
                future.set_result(message.error)
            elif message.error_type is None:
                future.set_result(message.embeddings)
            else:
                error = {"ValueError": ValueError, "CacheBusyError": CacheBusyError}.get(message.error_type)
                future.set_exception((error or RuntimeError)(message.message))

    def _stalled(self) -> bool:
        """Requests are open, and the core process has sent nothing for the stall timeout."""
        if self.stall_timeout_s is None or self._core is None or not self._core.killable or not self._sinks:
            return False
        return time.monotonic() - self._last_heard > self.stall_timeout_s

    def _replace_stalled_core(self) -> None:
        """A step that never ends (a hung kernel, a deadlock): kill the core; its requests fail and another core
        starts, as for a core that died."""
        self.num_stalls += 1
        log.error("the engine core completed no step in %.0f s with %d requests open: killing it",
                  self.stall_timeout_s, len(self._sinks))  # fmt: skip
        self._core.kill()
        self._replace_dead_core(f"the engine stalled: no step completed in {self.stall_timeout_s:.0f} s")

    def _replace_dead_core(self, reason: str) -> None:
        self._ready = False
        log.error("%s: failing its %d requests", reason, len(self._sinks))
        self._fail_everything(RequestFailed(reason))
        self._close_sockets()
        if self._restarts >= MAX_RESTARTS:
            self.failure = f"the engine core failed {self._restarts + 1} times in a row ({reason})"
            log.error("%s: not restarting it", self.failure)
            self._stopping = True
            return
        self._restarts += 1
        self.num_restarts += 1
        try:
            self._start_core()
            log.warning("engine core restarted")
        except Exception:
            log.exception("could not restart the engine core")

    def _fail_everything(self, error: Exception) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            embeds, self._calls = self._calls, {}
        deliveries: dict[asyncio.AbstractEventLoop, _Delivery] = {}
        for loop, sink in sinks.values():
            deliveries.setdefault(loop, []).append((sink, error))
        for loop, delivery in deliveries.items():
            _deliver(loop, delivery)
        for future in embeds.values():
            if not future.done():
                future.set_exception(error)

    def _close_sockets(self) -> None:
        with self._lock:
            sockets, self._to_core, self._from_core = (self._to_core, self._from_core), None, None
        for socket in sockets:
            if socket is not None:
                socket.close(linger=0)

    def _send(self, message) -> None:
        """Send to the core (caller holds ``_lock``); never waits."""
        if not self._ready or self._to_core is None:
            raise EngineShutDown("the engine core is not running (restarting or shut down)")
        try:
            self._to_core.send(self._encode(message), flags=zmq.NOBLOCK)
        except zmq.Again as exc:
            raise EngineShutDown("the engine core is not taking requests (gone or stuck)") from exc

    # ---- requests -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Running and waiting sequences and KV cache usage, as of the core's last step."""
        return self._stats

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def submit(self, request: EngineRequest, sink: DeltaSink) -> None:
        """Send a validated request; its deltas (or the exception that ends it) go to ``sink`` on this event
        loop. Raises ``EngineShutDown`` when the core cannot take it and ``ValueError`` for an id already
        running."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stopping:
                raise EngineShutDown("the engine is shut down")
            if request.request_id in self._sinks:
                raise ValueError(f"request_id {request.request_id!r} is already running")
            if not self._sinks:
                self._last_heard = time.monotonic()  # an idle core sends nothing: the silence counts from now
            self._send(request)
            self._sinks[request.request_id] = (loop, sink)

    def abort(self, request_id: str, seq_index: int | None = None) -> None:
        """Stop a request (or one completion); its sink still gets the last delta (finish_reason "abort")."""
        with self._lock:
            try:
                self._send(AbortRequest(request_id, seq_index))
            except (EngineShutDown, zmq.ZMQError):
                pass  # a core that is gone holds nothing to abort

    async def stream(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """``submit`` as an iterator of deltas; closing it early aborts the request."""
        queue: asyncio.Queue[RequestDelta | Exception] = asyncio.Queue()
        self.submit(request, queue.put_nowait)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Tokenize, validate and stream one request as cumulative ``RequestOutput``s (local use: the terminal
        chat and tests; servers stream deltas). A bad request raises ``ValueError`` before anything is sent."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(self.tokenizer.encode, prompt, add_special_tokens)
        else:
            ids = list(prompt)
        self.limits.check_prompt(ids, params)
        request = EngineRequest(request_id or self.new_request_id(), ids, params)
        builder = OutputBuilder(self.tokenizer, request, prompt if isinstance(prompt, str) else None)
        async for delta in self.stream(request):
            for index in builder.add(delta):
                self.abort(request.request_id, index)  # a stop string ended that completion
            yield builder.output()

    async def embed(self, prompts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Each prompt's embedding (pooled as ``limits.pooling`` says), computed in the core between steps."""
        tokenizer = self.tokenizer

        def tokenize() -> list[list[int]]:
            return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

        token_lists = await asyncio.to_thread(tokenize)
        embeddings = await self._call(lambda call_id: EmbedCall(call_id, token_lists))
        return embeddings, sum(len(t) for t in token_lists)

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters served (a core that restarts loads them again: they are in its config)."""
        return sorted(self.config.lora_paths())

    async def load_lora(self, name: str, path: str | None) -> None:
        """Load adapter ``name`` from ``path`` (None: unload it); ``ValueError`` with the reason if the
        core refuses. Requests running meanwhile are not disturbed."""
        error = await self._call(lambda call_id: LoRACall(call_id, name, path))
        if error is not None:
            raise ValueError(error)
        modules = {k: v for k, v in self.config.lora_paths().items() if k != name}
        if path is not None:
            modules[name] = path
        modules_list = tuple(f"{k}={v}" for k, v in modules.items())
        self.config = dataclasses.replace(self.config, lora_modules=modules_list, enable_lora=True)

    async def _call(self, message: Callable[[int], EmbedCall | LoRACall]):
        """Send ``message(call_id)`` to the core; its answer's result (what ``_handle`` sets)."""
        call_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._send(message(call_id))
            self._calls[call_id] = future
        try:
            return await asyncio.wrap_future(future)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    # ---- shutdown -------------------------------------------------------------------------------------------

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop taking work, end every open request with ``EngineShutDown(reason)`` and tell the core to stop."""
        if self._stopping and not self._ready:
            return
        with self._lock:
            try:
                self._send(Shutdown())
            except (EngineShutDown, zmq.ZMQError):
                pass  # already gone
            self._stopping = True
            self._ready = False
        self._fail_everything(EngineShutDown(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        """``begin_shutdown``, wait for the core to exit (a process is killed after ``timeout``), release
        sockets. Blocking: from a coroutine, await ``ashutdown``."""
        self.begin_shutdown()
        if self._core is not None:
            self._core.join(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._close_sockets()
        self._context.term()
        self._dir.cleanup()

    async def ashutdown(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.shutdown, timeout)


def _deliver(loop: asyncio.AbstractEventLoop, delivery: _Delivery) -> None:
    """Run a step's sinks on their loop, in one wake-up; a loop that has closed has nobody to tell."""
    try:
        loop.call_soon_threadsafe(_run_sinks, delivery)
    except RuntimeError:
        pass


def _run_sinks(delivery: _Delivery) -> None:
    for sink, item in delivery:
        sink(item)
