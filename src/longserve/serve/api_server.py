"""The OpenAI- and Anthropic-compatible API server: routes, the app factory and its runner.

It is each served model's front end (``frontend``): it renders, tokenizes and detokenizes here, and streams
token ids to and from the model worker the controller picks over one channel per worker (``upstream``,
``engine_channel``). ``/v1/*`` needs an API key when ``ServeConfig.api_keys`` is set; ``/health``,
``/metrics`` and the web chat page at ``/`` (unless ``ServeConfig.web_ui`` is off; see ``web_ui``) are always
open. Errors leave in OpenAI's shape, or Anthropic's on ``/v1/messages`` (see ``errors``). At most ``max_in_flight_requests`` generation
requests are handled at once; more get 429. ``/health`` is readiness (503 until some worker serves a model),
``/live`` is liveness. ``begin_shutdown(app)`` ends every open stream with an error event and [DONE], so
stopping never waits on a long generation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response

from longserve.config import ServeConfig
from longserve.serve.anthropic import count_tokens, create_message
from longserve.serve.api_middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    InFlightLimitMiddleware,
    ServerLoad,
)
from longserve.serve.errors import install_error_handlers, model_not_found, service_unavailable
from longserve.serve.metrics import ApiMetrics
from longserve.serve.openai_chat import chat_completion
from longserve.serve.openai_completions import completion
from longserve.serve.openai_embeddings import embeddings
from longserve.serve.openai_responses import create_response
from longserve.serve.openai_tokenize import DetokenizeBody, TokenizeBody, detokenize, tokenize
from longserve.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from longserve.serve.protocol_anthropic import CountTokensRequest, MessagesRequest
from longserve.serve.protocol_responses import ResponsesRequest
from longserve.serve.upstream import Upstream, make_session
from longserve.serve.web_ui import mount_web_ui
from longserve.serve.worker_protocol import ListModelsResponse, LoadLoRARequest, UnloadLoRARequest

DRAIN_POLL_S = 0.05  # how often a drain checks whether the last request has ended
log = logging.getLogger(__name__)

# A body sent without Content-Type (curl --data-binary) is still read as JSON, as older FastAPI always did;
# newer FastAPI needs to be told, older FastAPI does not know the option.
_LENIENT_JSON = (
    {"strict_content_type": False}
    if "strict_content_type" in inspect.signature(FastAPI.__init__).parameters
    else {}
)
# Documented in the OpenAPI schema; the bodies are all ErrorResponse.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
GENERATION_ERRORS = {**ERROR_RESPONSES, 504: {"model": ErrorResponse}}  # 504: past request_timeout_s


def create_api_app(config: ServeConfig) -> FastAPI:
    """The API server app for ``config``: talks to the controller at ``config.controller_address``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = make_session()
        upstream = app.state.upstream = Upstream(
            session,
            config.controller_address,
            config.worker_connect_retries,
            config.worker_stream_timeout_s,
            config.worker_stream_keepalive_s,
            request_timeout_s=config.request_timeout_s,
            request_stall_timeout_s=config.request_stall_timeout_s,
            sse_keepalive_s=config.sse_keepalive_s,
        )
        try:
            yield
        finally:
            await upstream.aclose()
            await session.close()

    app = FastAPI(title="longserve OpenAI-compatible API", lifespan=lifespan, **_LENIENT_JSON)
    app.state.config = config
    app.state.metrics = ApiMetrics()
    app.state.load = ServerLoad()  # requests being handled; draining
    install_error_handlers(app)
    app.openapi = lambda: _openapi(app)
    # Added last = outermost: the key is checked before the body is read, and the limit before either.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys)
    app.add_middleware(
        InFlightLimitMiddleware,
        max_in_flight=config.max_in_flight_requests,
        rejected=app.state.metrics.rejected,
        load=app.state.load,
    )

    def upstream(request: Request) -> Upstream:
        return request.app.state.upstream

    @app.get("/health", responses=ERROR_RESPONSES)
    async def health(request: Request) -> dict:
        # Readiness, as vLLM's: 200 means a request sent now would be dispatched to a worker.
        if request.app.state.load.draining:
            raise service_unavailable("the server is shutting down (draining)", code="draining")
        models = await upstream(request).list_models()
        if not models:
            raise service_unavailable(
                "no worker serves a model (still loading, or every worker is gone)", code="no_worker"
            )
        return {"status": "ok", "models": sorted(set(models))}

    @app.get("/live")
    async def live() -> dict:
        return {"status": "alive"}  # liveness: the process answers, whatever the workers do

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        state = request.app.state
        await state.metrics.refresh_workers(state.upstream.session, config.controller_address.rstrip("/"))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        details = await upstream(request).model_details()
        return ModelList(data=[_model_card(name, details) for name in sorted(set(details.models))])

    @app.get("/v1/models/{model:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        details = await upstream(request).model_details()
        if model not in details.models:
            raise model_not_found(model)
        return _model_card(model, details)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> str:
        workers = await upstream(request).load_lora(body)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully ({len(workers)} workers)."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> str:
        workers = await upstream(request).load_lora(body)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully ({len(workers)} workers)."

    @app.post("/v1/chat/completions", response_model=None, responses=GENERATION_ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/completions", response_model=None, responses=GENERATION_ERRORS)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completion(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/responses", response_model=None, responses=GENERATION_ERRORS)
    async def create_responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/messages", response_model=None, responses=GENERATION_ERRORS)
    async def create_messages(body: MessagesRequest, request: Request) -> Response:
        return await create_message(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/messages/count_tokens", response_model=None, responses=ERROR_RESPONSES)
    async def messages_count_tokens(body: CountTokensRequest, request: Request) -> Response:
        return await count_tokens(body, upstream(request))

    @app.post("/v1/embeddings", response_model=None, responses=GENERATION_ERRORS)
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await embeddings(body, upstream(request))

    @app.post("/tokenize", response_model=None, responses=GENERATION_ERRORS)
    async def create_tokenize(body: TokenizeBody, request: Request) -> Response:
        return await tokenize(body, upstream(request))

    @app.post("/detokenize", response_model=None, responses=GENERATION_ERRORS)
    async def create_detokenize(body: DetokenizeBody, request: Request) -> Response:
        return await detokenize(body, upstream(request))

    mount_web_ui(app, enabled=config.web_ui)
    return app


async def drain(app: FastAPI) -> None:
    """Refuse new requests (503 "draining", /health 503) and return once the open ones have ended."""
    load: ServerLoad = app.state.load
    load.draining = True
    app.state.metrics.draining.set(1)
    while load.in_flight:
        await asyncio.sleep(DRAIN_POLL_S)


def begin_shutdown(app: FastAPI) -> None:
    """The server is stopping: every open generation ends now with an error event (and [DONE])."""
    upstream = getattr(app.state, "upstream", None)
    if upstream is not None:
        upstream.stopping.set()


def _model_card(name: str, details: ListModelsResponse) -> ModelCard:
    """``name``'s card: its context length and what its embeddings are, as its live workers report them."""
    parent = details.lora_parents.get(name)
    card = ModelCard(
        id=name, root=parent or name, parent=parent, max_model_len=details.context_lengths.get(name)
    )
    embedding = details.embeddings.get(name)
    if embedding is not None:
        card.pooling = embedding.pooling
        card.embedding_dimensions = embedding.dimensions
        card.normalized_embeddings = embedding.normalized
        card.embedding_only = embedding.embedding_only
    return card


def _openapi(app: FastAPI) -> dict:
    """The schema without FastAPI's 422 answers: a bad body gets 400 in OpenAI's shape here, never 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


__all__ = ["begin_shutdown", "create_api_app", "drain"]
