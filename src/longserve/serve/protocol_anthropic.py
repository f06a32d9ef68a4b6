"""Anthropic Messages API request shape (``POST /v1/messages``, ``/v1/messages/count_tokens``) and its
translation to a chat request.

``system`` is a string or text blocks; ``messages`` alternate user and assistant turns whose content is a
string or blocks: ``text``, ``tool_use`` (assistant) and ``tool_result`` (user), while ``thinking`` blocks
of earlier assistant turns are dropped, as Anthropic's own API drops them from the prompt. Tools are
``{"name", "description", "input_schema"}``; ``tool_choice`` is auto, any, a named tool or none. Images and
documents are refused with a 400 naming the block.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longserve.serve.errors import APIError
from longserve.serve.protocol import ChatCompletionRequest

_LOOSE = ConfigDict(extra="allow", strict=False, allow_inf_nan=False)
# Chat request fields by their Messages names, for error messages.
_MESSAGES_FIELD = {"max_tokens": "max_tokens", "stop": "stop_sequences"}


class AnthropicMessage(BaseModel):
    model_config = _LOOSE

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    model_config = _LOOSE

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom" or absent; server tools (web search...) are refused


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)  # required, as Anthropic's
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)  # Anthropic's range
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False
    # {"type": "enabled" | "disabled"}: enable_thinking for the template; reasoning comes as thinking blocks
    thinking: dict[str, Any] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as chat completions (a 400 naming the Messages field when it cannot be)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(self.system, self.messages),
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        kind = (self.thinking or {}).get("type")
        if kind in ("enabled", "disabled"):  # templates that can think take it as enable_thinking (Qwen3's)
            body["chat_template_kwargs"] = {"enable_thinking": kind == "enabled"}
        if self.tools:
            body["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"], parallel = _chat_tool_choice(self.tool_choice)
            body["parallel_tool_calls"] = parallel
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            path = [str(part) for part in error["loc"]]
            path[:1] = [_MESSAGES_FIELD.get(path[0], path[0])] if path else []
            raise APIError(f"{'.'.join(path)}: {error['msg']}", param=".".join(path) or None) from None


class CountTokensRequest(BaseModel):
    """``/v1/messages/count_tokens``: what the prompt of a Messages request would hold."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        fields = self.model_dump(
            exclude_none=True, include={"model", "messages", "system", "tools", "tool_choice"}
        )
        return MessagesRequest.model_validate({**fields, "max_tokens": 1}).chat_request()


def chat_messages(system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[dict]:
    """Messages in chat's shape: a system message, then each turn; tool_use blocks become an assistant turn's
    tool calls and tool_result blocks tool messages."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _texts(system, "system")})
    for i, message in enumerate(messages):
        where = f"messages.{i}.content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            kind, at = block.get("type"), f"{where}.{j}"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
                continue
            elif kind == "tool_use" and message.role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise APIError("a tool_use block needs an id and a name", param=at)
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"], "arguments": arguments}})  # fmt: skip
            elif kind == "tool_result" and message.role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise APIError("a tool_result block needs a tool_use_id", param=at)
                content = block.get("content")
                text = content if isinstance(content, str) else _texts(content or [], f"{at}.content")
                if block.get("is_error"):
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            else:
                raise APIError(
                    f"content block type {kind!r} is not supported in a {message.role} turn "
                    "(text, tool_use and tool_result only)",
                    param=f"{at}.type",
                )
        out.extend(results)  # a user turn's tool results answer the calls just before them
        if calls:
            out.append({"role": "assistant", "content": "".join(texts), "tool_calls": calls})
        elif texts or not results:
            out.append({"role": message.role, "content": "".join(texts)})
    return out


def _texts(blocks: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(
                f"block type {block.get('type')!r} is not supported here (text only)", param=f"{where}.{j}"
            )
        texts.append(block["text"])
    return "\n".join(texts)


def _chat_tool(tool: AnthropicTool, i: int) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise APIError(
            f"tool type {tool.type!r} is not supported (custom tools only)", param=f"tools.{i}.type"
        )
    function = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any]) -> tuple[str | dict[str, Any], bool]:
    """(chat's tool_choice, parallel_tool_calls) for Anthropic's ``tool_choice``."""
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise APIError("tool_choice of type 'tool' needs the tool's name", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError("tool_choice type must be auto, any, tool or none", param="tool_choice.type")
