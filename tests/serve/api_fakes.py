"""Fake worker and fake controller for the API server tests: small FastAPI apps speaking ``worker_protocol``.

The fake worker tokenizes one character per token (token id = code point) and "generates" the alphabet:
token j of completion i is ``chr(ord("a") + (j + i + seed) % 26)``. Prompts steer it: one containing ``DIE``
makes the worker drop the connection after two deltas; ``SLOW`` makes it emit a token every 50 ms for a long
time. Every generate request is recorded (``app.state.requests``) and every stream closed early is counted
(``app.state.aborted``), so tests can check what the API server sent and that it hung up.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from longserve.engine.sampling_params import SamplingParams
from longserve.serve.worker_protocol import (
    ChatTemplateRequest,
    ChatTemplateResponse,
    CompletionDelta,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorInfo,
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    ListModelsResponse,
    ListWorkersResponse,
    TokenLogprobInfo,
    TopLogprob,
    Usage,
    WorkerGenerateRequest,
    WorkerInfo,
    WorkerStatus,
    WorkerStreamChunk,
)

MODEL = "fake-model"
CONTEXT_LENGTH = 64
EOS_AFTER = 40  # a completion with no max_tokens ends with "stop" here


def token_text(token_id: int) -> str:
    return chr(token_id)


def logprob_info(token_id: int, position: int, top: int) -> TokenLogprobInfo:
    logprob = -0.5 - 0.01 * position
    alternatives = [token_id] + [ord("A") + (position + k) % 26 for k in range(max(0, top - 1))]
    return TokenLogprobInfo(
        token_id=token_id,
        token=token_text(token_id),
        logprob=logprob,
        top=[
            TopLogprob(token_id=t, token=token_text(t), logprob=logprob - k)
            for k, t in enumerate(alternatives[:top])
        ],
    )


def _error(
    message: str, param: str | None = None, status: int = 400, code: str | None = None
) -> JSONResponse:
    info = ErrorInfo(message=message, param=param, status=status, code=code)
    return JSONResponse(info.model_dump(), status_code=status)


def create_fake_worker(model: str = MODEL) -> FastAPI:
    app = FastAPI()
    app.state.requests = []  # WorkerGenerateRequest, in arrival order
    app.state.aborted = 0
    app.state.finished = 0

    @app.post("/worker_generate_stream")
    async def generate_stream(body: WorkerGenerateRequest):
        app.state.requests.append(body)
        if body.model != model:
            return _error(f"unknown model {body.model}", "model", 404, "model_not_found")
        try:
            params = SamplingParams(**body.sampling.model_dump())
        except ValueError as exc:
            return _error(str(exc), str(exc).split(" ", 1)[0])
        prompt_ids = [ord(c) for c in body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > CONTEXT_LENGTH:
            message = (
                f"This model's maximum context length is {CONTEXT_LENGTH} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {params.max_tokens}"
            )
            return _error(message, "max_tokens", code="context_length_exceeded")
        text = body.prompt if isinstance(body.prompt, str) else ""
        return _ClosingStream(_lines(app, body.request_id or "r", prompt_ids, text, params))

    @app.post("/apply_chat_template")
    async def apply_chat_template(body: ChatTemplateRequest):
        if body.model != model:
            return _error(f"unknown model {body.model}", "model", 404, "model_not_found")
        rendered = "".join(f"<{m['role']}>{m['content']}" for m in body.messages)
        return ChatTemplateResponse(prompt=rendered + ("<assistant>" if body.add_generation_prompt else ""))

    @app.post("/worker_get_embeddings")
    async def get_embeddings(body: EmbeddingsRequest):
        vectors, tokens = [], 0
        for item in body.inputs:
            n = len(item)
            tokens += n
            norm = math.sqrt(n * n + 1)
            vectors.append([n / norm, 1 / norm, 0.0])
        return EmbeddingsResponse(embeddings=vectors, prompt_tokens=tokens)

    @app.post("/worker_get_status")
    async def status():
        return WorkerStatus(model_names=[model], running=2, waiting=1, kv_cache_usage=0.25)

    return app


class _ClosingStream(StreamingResponse):
    """Closes the line generator when the response ends however it ends (as the real worker does), so a
    client hanging up is seen at once and not at garbage collection."""

    def __init__(self, lines) -> None:
        super().__init__(lines, media_type="application/x-ndjson")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _lines(app: FastAPI, request_id: str, prompt_ids: list[int], text: str, params: SamplingParams):
    def line(chunk: WorkerStreamChunk) -> bytes:
        return (chunk.model_dump_json() + "\n").encode()

    prompt_logprobs = None
    if params.prompt_logprobs is not None:
        prompt_logprobs = [None] + [
            logprob_info(t, j, params.prompt_logprobs) for j, t in enumerate(prompt_ids[1:])
        ]
    slow, die = "SLOW" in text, "DIE" in text
    limit = (
        params.max_tokens
        if params.max_tokens is not None
        else min(EOS_AFTER, CONTEXT_LENGTH - len(prompt_ids))
    )
    if slow:
        limit = params.max_tokens or 1000
    finished_cleanly = False
    try:
        yield line(
            WorkerStreamChunk(
                request_id=request_id, prompt_token_ids=prompt_ids, prompt_logprobs=prompt_logprobs
            )
        )
        texts = [""] * params.n
        done = [False] * params.n
        generated = 0
        for j in range(limit):
            if slow:
                await asyncio.sleep(0.05)
            if die and j == 2:
                raise RuntimeError("worker died")  # uvicorn drops the connection mid-body
            deltas = []
            for i in range(params.n):
                if done[i]:
                    continue
                token = ord("a") + (j + i + (params.seed or 0)) % 26
                generated += 1
                piece = token_text(token)
                texts[i] += piece
                finish, stop_reason = None, None
                stop = next((s for s in params.stop if s in texts[i]), None)
                if stop is not None:
                    piece = piece[: len(piece) - len(stop)] if texts[i].endswith(stop) else ""
                    finish, stop_reason = "stop", stop
                elif j == limit - 1:
                    finish = "length" if params.max_tokens is not None or slow else "stop"
                done[i] = finish is not None
                logprobs = [logprob_info(token, j, params.logprobs)] if params.logprobs is not None else None
                deltas.append(
                    CompletionDelta(
                        index=i,
                        text=piece,
                        token_ids=[token],
                        logprobs=logprobs,
                        finish_reason=finish,
                        stop_reason=stop_reason,
                    )
                )
            if all(done):
                usage = Usage(
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=generated,
                    total_tokens=len(prompt_ids) + generated,
                )
                yield line(
                    WorkerStreamChunk(request_id=request_id, outputs=deltas, finished=True, usage=usage)
                )
                finished_cleanly = True
                return
            yield line(WorkerStreamChunk(request_id=request_id, outputs=deltas))
    finally:
        if finished_cleanly:
            app.state.finished += 1
        else:
            app.state.aborted += 1


def create_fake_controller(workers: list[str], models: tuple[str, ...] = (MODEL,)) -> FastAPI:
    """Dispatches to the first of ``workers`` not excluded; ``app.state.workers`` may be changed by tests."""
    app = FastAPI()
    app.state.workers = list(workers)
    app.state.models = list(models)
    app.state.address_requests = []  # GetWorkerAddressRequest, in arrival order

    @app.post("/list_models")
    async def list_models():
        return ListModelsResponse(models=app.state.models)

    @app.post("/get_worker_address")
    async def get_worker_address(body: GetWorkerAddressRequest):
        app.state.address_requests.append(body)
        if body.model not in app.state.models:
            return GetWorkerAddressResponse(address="")
        candidates = [w for w in app.state.workers if w not in body.exclude]
        return GetWorkerAddressResponse(address=candidates[0] if candidates else "")

    @app.post("/list_workers")
    async def list_workers():
        status = WorkerStatus(model_names=app.state.models[:1], running=7, kv_cache_usage=0.5)
        return ListWorkersResponse(
            workers=[
                WorkerInfo(worker_address=w, status=status, last_heart_beat=time.monotonic())
                for w in app.state.workers
            ]
        )

    return app


def sse_events(raw: str) -> list[dict | str]:
    """The ``data:`` payloads of an SSE body: parsed JSON, or the string "[DONE]"."""
    events: list[dict | str] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
