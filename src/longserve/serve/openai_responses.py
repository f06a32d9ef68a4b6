"""POST /v1/responses (stateless): the request runs as a chat completion; its answer is shaped as a Responses
object (message and function_call output items), or streamed as the Responses events the ``openai`` client's
``responses.create(stream=True)`` reads: response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta ... done, function_call_arguments.delta ... done, response.completed
(or response.failed when the worker stream breaks).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from longserve.serve.generation import StreamBroken
from longserve.serve.metrics import ApiMetrics
from longserve.serve.openai_chat import chat_chunks, start_chat, whole_chat
from longserve.serve.openai_common import streaming_response
from longserve.serve.protocol import ChatCompletionResponse, UsageInfo, new_id, now
from longserve.serve.protocol_responses import ResponsesRequest
from longserve.serve.upstream import Upstream


async def create_response(
    req: ResponsesRequest, request: Request, upstream: Upstream, metrics: ApiMetrics
) -> Response:
    chat = req.chat_request()
    response_id = new_id("resp")
    run = await start_chat(chat, request, upstream, metrics, request_id=response_id)
    if req.stream:
        return streaming_response(run.generation, _events(run, chat, req, response_id))
    async with run.generation:
        answer = await whole_chat(run, chat)
    body = _response(req, response_id, _output_items(answer), answer.choices[0].finish_reason, answer.usage)
    return Response(json.dumps(body), media_type="application/json")


def _response(
    req: ResponsesRequest,
    response_id: str,
    output: list[dict[str, Any]],
    finish_reason: str | None,
    usage: UsageInfo | None,
    *,
    status: str | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    if status is None:
        status = "incomplete" if finish_reason == "length" else "completed"
    cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at or now(),
        "status": status,
        "model": req.model,
        "output": output,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls,
        "text": req.text or {"format": {"type": "text"}},
        "metadata": req.metadata or {},
        "store": False,
        "usage": None
        if usage is None
        else {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        },
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


def _output_items(answer: ChatCompletionResponse) -> list[dict[str, Any]]:
    message = answer.choices[0].message
    items = []
    if message.reasoning_content:
        items.append(_reasoning_item(new_id("rs"), message.reasoning_content))
    if message.content:
        items.append(_message_item(new_id("msg"), message.content))
    for call in message.tool_calls:
        items.append(_call_item(new_id("fc"), call.id, call.function.name, call.function.arguments))
    return items


async def _events(run, chat, req: ResponsesRequest, response_id: str) -> AsyncIterator[str]:
    """Chat stream chunks -> Responses events, one output item open at a time (text, then each call)."""
    sequence = 0
    created_at = now()
    output: list[dict[str, Any]] = []  # finished items, for response.completed
    current: dict[str, Any] | None = None  # the open item
    finish_reason, usage = None, None

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def close() -> list[str]:
        nonlocal current
        if current is None:
            return []
        item, index, current = current, len(output), None
        events = []
        if item["type"] == "reasoning":
            events.append(event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=item["text"]))  # fmt: skip
            done = _reasoning_item(item["id"], item["text"])
        elif item["type"] == "message":
            part = _text_part(item["text"])
            events.append(event("response.output_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=item["text"], logprobs=[]))  # fmt: skip
            events.append(event("response.content_part.done", item_id=item["id"], output_index=index,
                                content_index=0, part=part))  # fmt: skip
            done = _message_item(item["id"], item["text"])
        else:
            events.append(event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=item["arguments"]))  # fmt: skip
            done = _call_item(item["id"], item["call_id"], item["name"], item["arguments"])
        output.append(done)
        events.append(event("response.output_item.done", output_index=index, item=done))
        return events

    start = _response(req, response_id, [], None, None, status="in_progress", created_at=created_at)
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    try:
        async for chunk in chat_chunks(run, chat):
            if chunk is None:
                yield None  # nothing for a while: the writer sends a keep-alive
                continue
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish_reason = choice.finish_reason or finish_reason
                delta = choice.delta
                if delta.reasoning_content:
                    if current is None or current["type"] != "reasoning":
                        for e in close():
                            yield e
                        current = {"type": "reasoning", "id": new_id("rs"), "text": ""}
                        yield event("response.output_item.added", output_index=len(output),
                                    item=_reasoning_item(current["id"], "", status="in_progress"))  # fmt: skip
                    current["text"] += delta.reasoning_content
                    yield event("response.reasoning_text.delta", item_id=current["id"], output_index=len(output),
                                content_index=0, delta=delta.reasoning_content)  # fmt: skip
                if delta.content:
                    if current is None or current["type"] != "message":
                        for e in close():
                            yield e
                        current = {"type": "message", "id": new_id("msg"), "text": ""}
                        yield event("response.output_item.added", output_index=len(output),
                                    item=_message_item(current["id"], "", status="in_progress"))  # fmt: skip
                        yield event("response.content_part.added", item_id=current["id"], output_index=len(output),
                                    content_index=0, part=_text_part(""))  # fmt: skip
                    current["text"] += delta.content
                    yield event("response.output_text.delta", item_id=current["id"], output_index=len(output),
                                content_index=0, delta=delta.content, logprobs=[])  # fmt: skip
                for call in delta.tool_calls or []:
                    if call.id is not None:  # a new call starts
                        for e in close():
                            yield e
                        current = {"type": "function_call", "id": new_id("fc"), "call_id": call.id,
                                   "name": call.function.name, "arguments": ""}  # fmt: skip
                        added = _call_item(current["id"], call.id, current["name"], "", status="in_progress")
                        yield event("response.output_item.added", output_index=len(output), item=added)
                    if call.function.arguments:
                        current["arguments"] += call.function.arguments
                        yield event("response.function_call_arguments.delta", item_id=current["id"],
                                    output_index=len(output), delta=call.function.arguments)  # fmt: skip
    except StreamBroken as exc:
        failed = _response(req, response_id, output, None, usage, status="failed", created_at=created_at)
        failed["error"] = {"code": exc.info.code or exc.info.type, "message": exc.info.message}
        yield event("response.failed", response=failed)
        return
    for e in close():
        yield e
    final = _response(req, response_id, output, finish_reason, usage, created_at=created_at)
    yield event(
        "response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final
    )
