"""The OpenAI-compatible API server: routes, the app factory and its runner.

It holds no model: every request goes to a model worker the controller picks (see ``upstream``), with
shared HTTP clients per app. ``/v1/*`` needs an API key when ``ServeConfig.api_keys`` is set; ``/health`` and
``/metrics`` are always open. Errors always leave in OpenAI's shape (see ``errors``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from longserve.config import ServeConfig
from longserve.serve.api_middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from longserve.serve.errors import install_error_handlers, model_not_found
from longserve.serve.metrics import ApiMetrics
from longserve.serve.openai_chat import chat_completion
from longserve.serve.openai_completions import completion
from longserve.serve.openai_embeddings import embeddings
from longserve.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from longserve.serve.upstream import Upstream, make_client, make_stream_session

log = logging.getLogger(__name__)

# A body sent without Content-Type (curl --data-binary) is still read as JSON, as older FastAPI always did;
# newer FastAPI needs to be told, older FastAPI does not know the option.
_LENIENT_JSON = (
    {"strict_content_type": False}
    if "strict_content_type" in inspect.signature(FastAPI.__init__).parameters
    else {}
)
# Documented in the OpenAPI schema; the bodies are all ErrorResponse.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def create_api_app(config: ServeConfig) -> FastAPI:
    """The API server app for ``config``: talks to the controller at ``config.controller_address``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client, streams = make_client(), make_stream_session()
        app.state.http = client
        app.state.upstream = Upstream(
            client, streams, config.controller_address, config.worker_connect_retries
        )
        try:
            yield
        finally:
            await client.aclose()
            await streams.close()

    app = FastAPI(title="longserve OpenAI-compatible API", lifespan=lifespan, **_LENIENT_JSON)
    app.state.config = config
    app.state.metrics = ApiMetrics()
    install_error_handlers(app)
    # Added last = outermost: the key is checked before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys)

    def upstream(request: Request) -> Upstream:
        return request.app.state.upstream

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        state = request.app.state
        await state.metrics.refresh_workers(state.http, config.controller_address.rstrip("/"))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        names = await upstream(request).list_models()
        return ModelList(data=[ModelCard(id=name) for name in sorted(set(names))])

    @app.get("/v1/models/{model:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        if model not in await upstream(request).list_models():
            raise model_not_found(model)
        return ModelCard(id=model)

    @app.post("/v1/chat/completions", response_model=None, responses=ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/completions", response_model=None, responses=ERROR_RESPONSES)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completion(body, request, upstream(request), request.app.state.metrics)

    @app.post("/v1/embeddings", response_model=None, responses=ERROR_RESPONSES)
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await embeddings(body, upstream(request))

    return app


__all__ = ["create_api_app"]
