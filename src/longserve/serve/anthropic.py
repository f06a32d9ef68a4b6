"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat path.

The request runs as a chat completion (``protocol_anthropic``: same template, engine path, admission,
failover and metrics); its answer is shaped as a ``Message`` with text and ``tool_use`` blocks, or streamed
as the events the ``anthropic`` SDK reads: message_start, content_block_start / _delta (text_delta,
input_json_delta) / _stop per block, message_delta (stop_reason, usage), message_stop; ``ping`` while nothing
comes, and an ``error`` event if the worker stream breaks. Errors on these routes are in Anthropic's shape
(``errors.anthropic_error_body``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from longserve.serve.errors import anthropic_error_body
from longserve.serve.generation import StreamBroken
from longserve.serve.metrics import ApiMetrics
from longserve.serve.openai_chat import ChatRun, chat_chunks, plan_chat_tools, start_chat, whole_chat
from longserve.serve.openai_common import EventStreamResponse
from longserve.serve.protocol import ChatCompletionRequest, UsageInfo, new_id
from longserve.serve.protocol_anthropic import CountTokensRequest, MessagesRequest
from longserve.serve.upstream import Upstream

PING = 'event: ping\ndata: {"type": "ping"}\n\n'


async def create_message(
    req: MessagesRequest, request: Request, upstream: Upstream, metrics: ApiMetrics
) -> Response:
    chat = req.chat_request()
    message_id = new_id("msg")
    run = await start_chat(chat, request, upstream, metrics, request_id=message_id)
    if req.stream:
        return EventStreamResponse(_events(run, chat, req, message_id), run.generation.aclose)
    async with run.generation:
        answer = await whole_chat(run, chat)
    choice = answer.choices[0]
    content: list[dict[str, Any]] = []
    if choice.message.reasoning_content:
        content.append({"type": "thinking", "thinking": choice.message.reasoning_content, "signature": ""})
    if choice.message.content:
        content.append({"type": "text", "text": choice.message.content})
    content += [
        _tool_use(call.id, call.function.name, call.function.arguments) for call in choice.message.tool_calls
    ]
    reason, sequence = _stop_reason(choice.finish_reason, choice.stop_reason, req)
    return _json(_message(message_id, req, content, reason, sequence, _usage(answer.usage)))


async def count_tokens(req: CountTokensRequest, upstream: Upstream) -> Response:
    chat = req.chat_request()
    frontend = await upstream.frontend(chat.model)
    tools, messages = plan_chat_tools(chat, frontend)
    prompt = await frontend.render_chat(messages, True, tools.template_tools, chat.chat_template_kwargs)
    return _json({"input_tokens": len(await frontend.encode(prompt, False))})


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")


def _message(
    message_id: str,
    req: MessagesRequest,
    content: list,
    reason: str | None,
    sequence: str | None,
    usage: dict,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage,
    }


def _usage(usage: UsageInfo | None, prompt_tokens: int | None = None) -> dict[str, Any]:
    usage = usage or UsageInfo(prompt_tokens=prompt_tokens or 0)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_use(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    try:
        arguments_value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        arguments_value = None
    if not isinstance(arguments_value, dict):  # Anthropic's input is an object; keep what the model wrote
        arguments_value = {"arguments": arguments}
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments_value}


def _stop_reason(
    finish: str | None, stop: int | str | None, req: MessagesRequest
) -> tuple[str | None, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for chat's finish reason and the stop that matched."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str) and stop in (req.stop_sequences or []):
        return "stop_sequence", stop
    return ("end_turn", None) if finish is not None else (None, None)


def _event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


async def _events(
    run: ChatRun, chat: ChatCompletionRequest, req: MessagesRequest, message_id: str
) -> AsyncIterator[str]:
    """Chat stream chunks -> Messages events, one content block open at a time (text, then each tool use)."""
    prompt_tokens = run.generation.prompt_token_counts[0]
    start = _message(message_id, req, [], None, None, _usage(None, prompt_tokens))
    yield _event("message_start", message=start)
    index = -1  # the open block's index
    kind: str | None = None  # its type
    finish, stop, usage = None, None, None
    try:
        async for chunk in chat_chunks(run, chat):
            if chunk is None:
                yield PING
                continue
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                stop = choice.stop_reason if choice.stop_reason is not None else stop
                delta = choice.delta
                if delta.reasoning_content:
                    if kind != "thinking":
                        if kind is not None:
                            yield _event("content_block_stop", index=index)
                        index, kind = index + 1, "thinking"
                        block = {"type": "thinking", "thinking": "", "signature": ""}
                        yield _event("content_block_start", index=index, content_block=block)
                    thinking = {"type": "thinking_delta", "thinking": delta.reasoning_content}
                    yield _event("content_block_delta", index=index, delta=thinking)
                if delta.content:
                    if kind != "text":
                        if kind is not None:
                            yield _event("content_block_stop", index=index)
                        index, kind = index + 1, "text"
                        yield _event(
                            "content_block_start", index=index, content_block={"type": "text", "text": ""}
                        )
                    yield _event(
                        "content_block_delta",
                        index=index,
                        delta={"type": "text_delta", "text": delta.content},
                    )
                for call in delta.tool_calls or []:
                    if call.id is not None:  # a new call starts
                        if kind is not None:
                            yield _event("content_block_stop", index=index)
                        index, kind = index + 1, "tool_use"
                        block = {"type": "tool_use", "id": call.id, "name": call.function.name, "input": {}}
                        yield _event("content_block_start", index=index, content_block=block)
                    if call.function.arguments:
                        json_delta = {"type": "input_json_delta", "partial_json": call.function.arguments}
                        yield _event("content_block_delta", index=index, delta=json_delta)
    except StreamBroken as exc:
        yield _event("error", error=anthropic_error_body(exc.info.status or 500, exc.info.message)["error"])
        return
    if kind is not None:
        yield _event("content_block_stop", index=index)
    reason, sequence = _stop_reason(finish, stop, req)
    yield _event(
        "message_delta",
        delta={"stop_reason": reason, "stop_sequence": sequence},
        usage=_usage(usage, prompt_tokens),
    )
    yield _event("message_stop")
