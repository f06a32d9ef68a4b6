"""Model worker: one engine core (``EngineCoreClient``) behind two doors, registered with a controller.

- The front-end stream (``worker_stream``): API servers send tokenized requests and get token deltas back
  over one ZMQ connection each; this is the serving data path.
- The HTTP API (``worker_app``) for other clients and for the front ends' one-time set-up.

``ModelWorker`` is what both doors call. A request rejected before it generates (unknown model, bad sampling
value, prompt too long, a full queue) gets an error in ``ErrorInfo``'s shape; once a stream has started, an
error is its final message. A semaphore of ``worker_concurrency`` bounds the requests inside the engine at
once and at most ``max_queue_len`` more wait for it; beyond that a request gets 429 at once, whichever door
it came through.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from urllib.parse import urlsplit

import msgspec

from longserve.config import ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.engine.protocol import (
    CacheBusyError,
    EngineRequest,
    EngineShutDown,
    RequestDelta,
    RequestFailed,
)
from longserve.loading.pooling_config import truncate_embedding
from longserve.serve.reasoning_parsers import detect_reasoning_parser, get_reasoning_parser
from longserve.serve.stream_chunks import (
    ChunkBuilder,
    TokenTexts,
    rejection_info,
    sampling_params,
)
from longserve.serve.tool_parsers import detect_tool_parser, get_tool_parser
from longserve.serve.worker_protocol import (
    CompletionDelta,
    EmbeddingDetails,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorInfo,
    FrontendInfo,
    SpecDecodeCounts,
    WorkerGenerateRequest,
    WorkerGenerateResponse,
    WorkerStatus,
    WorkerStreamChunk,
)
from longserve.serve.worker_registration import ControllerLink
from longserve.serve.worker_stream import WorkerStreamServer

DRAIN_POLL_S = 0.05  # how often a drain checks whether the last request has ended
log = logging.getLogger(__name__)


class WorkerError(Exception):
    """A request the worker rejects; the app answers it with ``info.status`` and ``info`` as the body."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


def rejection(exc: ValueError, default_param: str | None = None) -> WorkerError:
    return WorkerError(rejection_info(exc, default_param))


class ModelWorker:
    """Admission control (semaphore + in-flight count), request handling and the link to the controller."""

    def __init__(
        self,
        engine: EngineCoreClient,
        config: ServeConfig,
        model_name: str | list[str],
        *,
        speed: float = 1.0,
    ) -> None:
        self.engine = engine
        self.config = config
        self.base_names = [model_name] if isinstance(model_name, str) else list(model_name)  # aliases
        self.speed = speed
        self.address = config.own_worker_address
        # None or "" runs the worker stand-alone (tests, a single process that polls it).
        self.controller_address = (config.controller_address or "").rstrip("/") or None
        self.semaphore = asyncio.Semaphore(config.worker_concurrency)
        self.tokenizer = engine.tokenizer
        self.token_texts = TokenTexts(engine.tokenizer)
        self.in_flight = 0  # requests running or queued for the semaphore (the controller's queue length)
        self.num_requests = 0  # generate and embedding requests received
        self.num_errors = 0  # of those, failed with an error (rejections included)
        self.num_aborted = 0  # streams closed before their last output: the client went away
        self.num_rejected = 0  # turned away with 429: the queue was full
        self.controller_link: ControllerLink | None = None  # while started with a controller
        self.draining = False  # shutting down: nothing new is admitted, what runs finishes
        # The API servers' door: bound now, so frontend_info can say where it is before anything connects.
        self.stream_server = WorkerStreamServer(
            self,
            config.host,
            urlsplit(self.address).hostname or config.host,
            config.worker_stream_keepalive_s,
            config.worker_stream_timeout_s,
        )
        tool_parser = config.tool_call_parser or detect_tool_parser(engine.tokenizer.chat_template, None)
        if tool_parser is not None:
            get_tool_parser(tool_parser)  # an unknown --tool-call-parser fails here, at start-up
        self.tool_parser = tool_parser
        reasoning = config.reasoning_parser or detect_reasoning_parser(engine.tokenizer.chat_template)
        if reasoning is not None:
            get_reasoning_parser(reasoning)  # an unknown --reasoning-parser fails here, at start-up
        self.reasoning_parser = reasoning

    @property
    def model_names(self) -> list[str]:
        """What requests may name: the model's aliases, then its LoRA adapters."""
        return self.base_names + self.engine.lora_names

    @property
    def lora_parents(self) -> dict[str, str]:
        return {name: self.base_names[0] for name in self.engine.lora_names}

    async def load_lora(self, name: str, path: str | None) -> None:
        """Load adapter ``name`` (``path`` None: unload it) and tell the controller at once; a bad adapter or
        name is a 400 (404 for unloading one that is not loaded)."""
        if path is not None and name in self.base_names:
            raise WorkerError(ErrorInfo(message=f"{name!r} is the base model's name", param="lora_name"))
        try:
            await self.engine.load_lora(name, path)
        except ValueError as exc:
            missing = path is None and "not loaded" in str(exc)
            raise WorkerError(
                ErrorInfo(
                    message=str(exc),
                    param="lora_name" if missing else "lora_path",
                    code="model_not_found" if missing else "invalid_lora_adapter",
                    status=404 if missing else 400,
                )
            ) from exc
        if self.controller_link is not None:
            await self.controller_link.update()

    # ---- status ---------------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """Longest prompt + completion a request may have: the model's limit or the whole KV cache."""
        return self.engine.limits.context_length

    def status(self) -> WorkerStatus:
        stats = self.engine.stats()  # as of the engine's last step: fine for dispatch and metrics
        return WorkerStatus(
            model_names=self.model_names,
            lora_parents=self.lora_parents,
            speed=self.speed,
            queue_length=self.in_flight,
            rejected=self.num_rejected,
            running=stats.running,
            waiting=stats.waiting,
            kv_cache_usage=stats.kv_cache_usage,
            context_length=self.context_length,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            spec_decode=None
            if stats.spec_decode is None
            else SpecDecodeCounts(**msgspec.structs.asdict(stats.spec_decode)),
            ready=self.engine.ready and not self.draining,
            draining=self.draining,
            engine_stalls=self.engine.num_stalls,
            engine_restarts=self.engine.num_restarts,
            running_loras=stats.running_loras,
            waiting_loras=stats.waiting_loras,
            max_loras=stats.max_loras,
            embedding=self.embedding_details(),
        )

    def embedding_details(self) -> EmbeddingDetails:
        limits = self.engine.limits
        return EmbeddingDetails(
            pooling=limits.pooling.pooling,
            normalized=limits.pooling.normalize,
            dimensions=limits.embedding_size,
            embedding_only=not limits.can_generate,
        )

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise WorkerError(
                ErrorInfo(
                    message=f"model {model!r} is not served by this worker (it serves {self.model_names})",
                    param="model",
                    code="model_not_found",
                    status=404,
                )
            )

    # ---- admission ------------------------------------------------------------------------------------------

    def reserve(self) -> None:
        """Take a place in this worker (running or queued); 429 when ``max_queue_len`` requests already wait.

        Every ``reserve`` is matched by one ``release``, however the request ends.
        """
        if self.draining:
            raise WorkerError(
                _shutting_down("the worker is shutting down (draining): another worker may serve it")
            )
        if self.in_flight >= self.config.worker_concurrency + self.config.max_queue_len:
            self.num_rejected += 1
            raise WorkerError(
                ErrorInfo(
                    message=(
                        f"the worker is at capacity ({self.config.worker_concurrency} running, "
                        f"{self.config.max_queue_len} queued); retry later"
                    ),
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    status=429,
                )
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def admission_error(self, request: EngineRequest) -> ErrorInfo | None:
        """Why a front end's request cannot start here now (None: it can): a full queue or a stopped engine."""
        try:
            self.reserve()
        except WorkerError as exc:
            return exc.info
        self.release()
        if not self.engine.ready:
            return _shutting_down(self.engine.failure or "the engine core is not running (restarting)")
        return None

    def frontend_info(self) -> FrontendInfo:
        """What an API server needs to be this model's front end: its tokenizer, template and limits."""
        tokenizer, limits = self.tokenizer, self.engine.limits
        return FrontendInfo(
            model_names=self.model_names,
            lora_parents=self.lora_parents,
            stream_address=self.stream_server.address,
            tokenizer_json=tokenizer.backend.to_str(),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            unk_token_id=tokenizer.unk_token_id,
            eos_token_ids=sorted(limits.eos_token_ids),
            chat_template=tokenizer.chat_template,
            tool_parser=self.tool_parser,
            reasoning_parser=self.reasoning_parser,
            vocab_size=limits.vocab_size,
            max_model_len=limits.max_model_len,
            cache_capacity=limits.cache_capacity,
            can_generate=limits.can_generate,
        )

    # ---- generation -----------------------------------------------------------------------------------------

    async def prepare(self, request: WorkerGenerateRequest) -> EngineRequest:
        """Validate and tokenize (after ``reserve``): a bad value raises a 400 ``WorkerError`` before any byte
        of the answer is sent."""
        self.num_requests += 1
        try:
            params = sampling_params(request.sampling)
            prompt = request.prompt
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(self.tokenizer.encode, prompt, request.add_special_tokens)
            else:
                ids = list(prompt)
            self.engine.limits.check_prompt(ids, params)
        except ValueError as exc:
            self.num_errors += 1
            raise rejection(exc) from exc
        lora = request.model if request.model in self.lora_parents else None
        return EngineRequest(request.request_id or f"wrk-{uuid.uuid4().hex}", ids, params, lora)

    async def deltas(self, request: EngineRequest) -> AsyncGenerator[RequestDelta]:
        """The engine's deltas for a prepared request, once it holds one of the ``worker_concurrency`` slots.

        Closing this generator early closes the engine's stream, which aborts the request and frees its KV
        blocks at the next step. An engine failure raises ``WorkerError`` (503 when the engine is stopping).
        """
        started = finished = False
        try:
            async with self.semaphore, aclosing(self.engine.stream(request)) as stream:
                async for delta in stream:
                    started, finished = True, delta.finished
                    yield delta
        except EngineShutDown as exc:
            self.num_errors += 1
            raise WorkerError(_shutting_down(str(exc))) from exc
        except RequestFailed as exc:
            self.num_errors += 1
            if exc.client_error:
                info = ErrorInfo(
                    message=str(exc), type="invalid_request_error", code="invalid_grammar", status=400
                )
                raise WorkerError(info) from exc
            raise WorkerError(server_error(exc, code="request_failed")) from exc
        finally:
            if started and not finished:  # closed or cancelled early: the client went away
                self.num_aborted += 1

    async def chunks(self, request: EngineRequest) -> AsyncGenerator[WorkerStreamChunk]:
        """The request's stream chunks: the prompt line, then one per delta with news; stop strings matched
        here abort their completion in the engine."""
        builder = ChunkBuilder(self.token_texts, request)
        async with aclosing(self.deltas(request)) as deltas:
            async for delta in deltas:
                if builder.first:
                    builder.first = False
                    yield builder.prompt_chunk(delta)
                chunk = builder.chunk(delta)
                for index in builder.stopped:
                    self.engine.abort(request.request_id, index)
                if chunk is not None:
                    yield chunk
                if builder.text.done:
                    return
        raise RuntimeError("the engine stream ended without a final output")

    async def stream(self, request: EngineRequest) -> AsyncGenerator[WorkerStreamChunk]:
        """worker_generate_stream's lines: the prompt line, delta lines, then a final line (usage or error).

        Every failure becomes the last line: the reader has the HTTP status 200 already.
        """
        request_id = request.request_id
        try:
            async with aclosing(self.chunks(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except WorkerError as exc:
            log.warning("request %s failed: %s", request_id, exc.info.message)
            yield WorkerStreamChunk(request_id=request_id, finished=True, error=exc.info)
        except Exception as exc:  # a bug here: logged with its traceback, and the stream's last line says so
            log.exception("request %s failed mid-stream", request_id)
            yield WorkerStreamChunk(request_id=request_id, finished=True, error=server_error(exc))

    async def generate(self, request: EngineRequest) -> WorkerGenerateResponse:
        """worker_generate: run a prepared request to the end and return the joined result."""
        n = request.params.n
        wants_logprobs = request.params.logprobs is not None
        whole = [CompletionDelta(index=i, logprobs=[] if wants_logprobs else None) for i in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        first = last = None
        async with aclosing(self.chunks(request)) as chunks:
            async for chunk in chunks:
                first = first or chunk
                last = chunk
                for out in chunk.outputs:
                    target = whole[out.index]
                    texts[out.index].append(out.text)
                    target.token_ids.extend(out.token_ids)
                    if target.logprobs is not None and out.logprobs:
                        target.logprobs.extend(out.logprobs)
                    if out.finish_reason is not None:
                        target.finish_reason, target.stop_reason = out.finish_reason, out.stop_reason
        if last is None or not last.finished:
            raise RuntimeError("the engine stream ended without a final output")
        for target, pieces in zip(whole, texts, strict=True):
            target.text = "".join(pieces)
        return WorkerGenerateResponse(
            request_id=request.request_id,
            outputs=whole,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            usage=last.usage,
        )

    async def embed(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        self.num_requests += 1
        size, dimensions = self.engine.limits.embedding_size, request.dimensions
        if dimensions is not None and dimensions > size:
            self.num_errors += 1
            message = f"dimensions must be at most {size} (this model's embedding size), got {dimensions}"
            raise WorkerError(ErrorInfo(message=message, param="dimensions"))
        self.reserve()
        try:
            async with self.semaphore:
                embeddings, prompt_tokens = await self.engine.embed(request.inputs)
        except ValueError as exc:
            self.num_errors += 1
            raise rejection(exc, default_param="inputs") from exc
        except CacheBusyError as exc:
            self.num_errors += 1
            raise WorkerError(ErrorInfo(message=str(exc), type="server_error", status=503)) from exc
        except EngineShutDown as exc:
            self.num_errors += 1
            raise WorkerError(_shutting_down(str(exc))) from exc
        finally:
            self.release()
        if dimensions is not None:
            normalize = self.engine.limits.pooling.normalize
            embeddings = [truncate_embedding(v, dimensions, normalize) for v in embeddings]
        return EmbeddingsResponse(embeddings=embeddings, prompt_tokens=prompt_tokens)

    async def drain(self) -> None:
        """Stop admitting (new requests get 503 and go to other workers), tell the controller at once, and
        return once every admitted request has ended."""
        self.draining = True
        if self.controller_link is not None:
            await self.controller_link.update()
        while self.in_flight:
            await asyncio.sleep(DRAIN_POLL_S)

    def begin_shutdown(self) -> None:
        """Stopping now: the engine ends every open request, and heartbeats go quiet (the controller may stop
        first)."""
        self.draining = True
        if self.controller_link is not None:
            self.controller_link.closing = True
        self.engine.begin_shutdown()

    # ---- controller link ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the front-end stream; register with the controller and heartbeat, in the background (without a
        controller the worker runs stand-alone)."""
        await self.stream_server.start()
        if self.controller_address is not None and self.controller_link is None:
            self.controller_link = ControllerLink(
                self.controller_address, self.address, self.config.heart_beat_interval_s, self.status
            )
            await self.controller_link.start()

    async def stop(self) -> None:
        link, self.controller_link = self.controller_link, None
        if link is not None:
            await link.stop()
        await self.stream_server.stop()


def server_error(exc: BaseException, code: str | None = None) -> ErrorInfo:
    message = str(exc) if isinstance(exc, RequestFailed) else f"{type(exc).__name__}: {exc}"
    return ErrorInfo(message=message, type="server_error", code=code, status=500)


def _shutting_down(message: str) -> ErrorInfo:
    # 503: nothing of this request survives here, but another worker may serve it.
    return ErrorInfo(message=message, type="server_error", code="worker_shutting_down", status=503)
