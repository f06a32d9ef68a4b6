"""What chat and completions share: OpenAI request fields -> worker sampling options, SSE framing, usage sums,
and the streaming response that always closes its worker streams.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import msgspec
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from longserve.engine.sampling_params import SamplingParams, StructuredOutputParams
from longserve.serve.errors import APIError, ClientDisconnected
from longserve.serve.generation import Generation, StreamBroken
from longserve.serve.protocol import PromptTokensDetails, SamplingRequest, UsageInfo
from longserve.serve.worker_protocol import ErrorInfo, SamplingOptions, StructuredOutputOptions, Usage

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


# SamplingParams fields whose API name differs (their messages start with the engine's name).
_API_FIELD = {"logprobs": "logprobs", "prompt_logprobs": "logprobs"}


def sampling_options(
    req: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_output: StructuredOutputParams | None = None,  # already checked (structured_request.py)
    skip_special_tokens: bool | None = None,  # overrides the request's (tool-call markers may be special)
) -> SamplingOptions:
    """The worker's sampling options; unset OpenAI fields keep the worker's defaults (which are OpenAI's)."""
    defaults = SamplingOptions()
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def pick(value, default):
        return default if value is None else value

    options = SamplingOptions(
        n=req.n,
        temperature=pick(req.temperature, defaults.temperature),
        top_p=pick(req.top_p, defaults.top_p),
        top_k=pick(req.top_k, defaults.top_k),
        min_p=pick(req.min_p, defaults.min_p),
        repetition_penalty=pick(req.repetition_penalty, defaults.repetition_penalty),
        presence_penalty=pick(req.presence_penalty, defaults.presence_penalty),
        frequency_penalty=pick(req.frequency_penalty, defaults.frequency_penalty),
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=pick(skip_special_tokens, req.skip_special_tokens),
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_output=StructuredOutputOptions.model_validate(dataclasses.asdict(structured_output))
        if structured_output is not None
        else None,
        logit_bias={int(token): bias for token, bias in req.logit_bias.items()} if req.logit_bias else None,
    )
    try:  # the worker checks again; checking here lets the error name the API's field, and saves a hop
        SamplingParams(**options.model_dump())
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise APIError(str(exc), param=_API_FIELD.get(field, field)) from None
    return options


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class TextFrames:
    """SSE frames of the chunk nearly every token makes: one choice whose only news is some text. The chunk is
    encoded once per choice index with a marker for the text; each frame then splices the text in, encoded
    as pydantic encodes a string, so the bytes are those of ``sse(build(index, text))``."""

    _MARK = "\x00"
    _MARK_JSON = '"\\u0000"'

    def __init__(self, build: Callable[[int, str], BaseModel]) -> None:
        self._build = build
        self._parts: dict[int, tuple[str, str]] = {}
        self._encode = msgspec.json.Encoder().encode

    def frame(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            head, tail = self._build(index, self._MARK).model_dump_json().split(self._MARK_JSON)
            parts = self._parts[index] = (f"data: {head}", f"{tail}\n\n")
        return parts[0] + self._encode(text).decode() + parts[1]


def sse_error(info: ErrorInfo) -> str:
    """The event a stream ends with when it breaks (followed by [DONE]); OpenAI clients raise on it."""
    error = {"message": info.message, "type": info.type, "param": info.param, "code": info.code}
    return sse({"error": error})


def add_usage(total: UsageInfo, usage: Usage | None) -> None:
    if usage is not None:
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.total_tokens += usage.total_tokens
        if usage.cached_tokens:  # OpenAI's shape: usage.prompt_tokens_details.cached_tokens
            details = total.prompt_tokens_details or PromptTokensDetails()
            details.cached_tokens += usage.cached_tokens
            total.prompt_tokens_details = details


async def sse_events(body: AsyncIterator[str | None]) -> AsyncIterator[str]:
    """``body``'s events, then [DONE]; a broken generation becomes an error event before [DONE].

    ``body`` yields ``None`` when nothing came for a while (a long queue or prefill): an SSE comment line goes
    out, which clients ignore, so proxies and client read timeouts see a live stream.
    """
    try:
        async with aclosing(body) as events:
            async for event in events:
                yield SSE_KEEPALIVE if event is None else event
    except StreamBroken as exc:
        yield sse_error(exc.info)
    except ClientDisconnected:
        return  # nobody to tell
    except Exception as exc:  # a bug here: logged with its traceback; the stream still ends in OpenAI's shape
        log.exception("streamed response failed")
        yield sse_error(ErrorInfo(message=f"internal error: {type(exc).__name__}", type="server_error"))
    yield SSE_DONE


class EventStreamResponse(StreamingResponse):
    """An SSE response that runs ``on_close`` however it ends: finished, client gone, or never started.

    Starlette stops iterating when a send fails (client gone) and never starts if the response start fails;
    in both cases the worker streams would stay open until garbage collection without this.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                await self._on_close()


def streaming_response(generation: Generation, body: AsyncIterator[str | None]) -> EventStreamResponse:
    return EventStreamResponse(sse_events(body), generation.aclose)
