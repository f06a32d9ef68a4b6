"""The model worker's HTTP door: the FastAPI app of ``worker_protocol`` around one ``ModelWorker``.

POST, JSON: frontend_info (tokenizer, template, limits and the stream's address), worker_generate_stream
(newline-delimited ``WorkerStreamChunk``), worker_generate, worker_get_embeddings, worker_get_status,
count_token, tokenize, detokenize, model_details, apply_chat_template, load_lora_adapter,
unload_lora_adapter; GET health (503 while the engine cannot serve or the worker drains), live. A rejection
is answered in ``ErrorInfo``'s shape with its status; an unexpected failure is a 500 in the same shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse, StreamingResponse

from longserve.config import ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.ndjson_stream import NdjsonStream
from longserve.serve.stream_chunks import invalid_body
from longserve.serve.worker import ModelWorker, WorkerError, rejection, server_error
from longserve.serve.worker_protocol import (
    ChatTemplateRequest,
    ChatTemplateResponse,
    CountTokenRequest,
    CountTokenResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorInfo,
    FrontendInfo,
    LoadLoRARequest,
    ModelDetails,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRARequest,
    WorkerGenerateRequest,
    WorkerGenerateResponse,
    WorkerStatus,
)


def create_worker_app(engine: EngineCoreClient, config: ServeConfig, model_name: str | list[str]) -> FastAPI:
    """The worker's FastAPI app; its lifespan registers with ``config.controller_address`` (if set)."""
    worker = ModelWorker(engine, config, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="longserve worker", lifespan=lifespan)
    app.state.worker = worker
    tokenizer = engine.tokenizer

    @app.exception_handler(WorkerError)
    async def on_worker_error(request: Request, exc: WorkerError) -> JSONResponse:
        return JSONResponse(exc.info.model_dump(), status_code=exc.info.status)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still re-raises it afterwards, so the traceback reaches the server log.
        info = server_error(exc)
        return JSONResponse(info.model_dump(), status_code=info.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        info = invalid_body(exc.errors())
        return JSONResponse(info.model_dump(), status_code=info.status)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(body: WorkerGenerateRequest) -> StreamingResponse:
        # Rejections (unknown model, full queue, bad values) are HTTP errors; the 200 and keep-alive lines
        # go out before the request waits for a slot, so a reader can time out a frozen worker only.
        worker.check_model(body.model)
        worker.reserve()
        try:
            prepared = await worker.prepare(body)
        except BaseException:
            worker.release()
            raise
        return NdjsonStream(worker.stream(prepared), config.worker_stream_keepalive_s, worker.release)

    @app.post("/worker_generate")
    async def worker_generate(body: WorkerGenerateRequest) -> WorkerGenerateResponse:
        worker.check_model(body.model)
        worker.reserve()
        try:
            return await worker.generate(await worker.prepare(body))
        finally:
            worker.release()

    @app.post("/worker_get_embeddings")
    async def worker_get_embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        worker.check_model(body.model)
        return await worker.embed(body)

    @app.post("/worker_get_status")
    async def worker_get_status() -> WorkerStatus:
        return worker.status()

    @app.post("/count_token")
    async def count_token(body: CountTokenRequest) -> CountTokenResponse:
        worker.check_model(body.model)
        if isinstance(body.prompt, list):
            return CountTokenResponse(count=len(body.prompt))
        return CountTokenResponse(count=len(await asyncio.to_thread(tokenizer.encode, body.prompt)))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        worker.check_model(body.model)
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        strs = [tokenizer.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(tokens=ids, token_strs=strs, max_model_len=worker.context_length)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        worker.check_model(body.model)
        unknown = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if unknown:
            message = f"token ids must be in [0, {tokenizer.vocab_size}); got {unknown[:5]}"
            raise WorkerError(ErrorInfo(message=message, param="tokens"))
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text)

    @app.post("/model_details")
    async def model_details() -> ModelDetails:
        return ModelDetails(model_names=worker.model_names, context_length=worker.context_length)

    @app.post("/apply_chat_template")
    async def apply_chat_template(body: ChatTemplateRequest) -> ChatTemplateResponse:
        worker.check_model(body.model)
        extra = {"tools": body.tools} if body.tools else {}
        try:
            prompt = await asyncio.to_thread(
                tokenizer.apply_chat_template, body.messages, body.add_generation_prompt, **extra
            )
        except ValueError as exc:  # no template, or the template rejected the messages
            raise rejection(exc, default_param="messages") from exc
        return ChatTemplateResponse(prompt=prompt, tool_parser=worker.tool_parser)

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest) -> dict:
        await worker.load_lora(body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest) -> dict:
        await worker.load_lora(body.lora_name, None)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/frontend_info")
    async def frontend_info() -> FrontendInfo:
        return worker.frontend_info()

    @app.get("/health", response_model=None)
    async def health() -> dict | JSONResponse:
        # Ready means a request sent now would be served: the engine core is up (not restarting or stopped).
        if worker.draining:
            return JSONResponse({"status": "draining", "model_names": worker.model_names}, status_code=503)
        if not engine.ready:
            body = {"status": "unavailable", "reason": engine.failure or "the engine core is not running"}
            return JSONResponse(body | {"model_names": worker.model_names}, status_code=503)
        return {"status": "ok", "model_names": worker.model_names}

    @app.get("/live")
    async def live() -> dict:
        return {"status": "alive"}

    return app
