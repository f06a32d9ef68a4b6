"""OpenAI Responses API request shape (``POST /v1/responses``, stateless) and its translation to a chat request.

Input is text or a list of items: messages (``input_text``/``output_text`` parts or plain text), and the
``function_call`` / ``function_call_output`` items of a tool round trip. Tools are flat function definitions
(``{"type": "function", "name", "parameters"}``); ``text.format`` is the response format. Nothing is stored:
``previous_response_id`` and ``background`` are refused with a 400 naming them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longserve.serve.errors import APIError
from longserve.serve.protocol import ChatCompletionRequest, OpenAIRequest

_LOOSE = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
# Chat request fields by their Responses names, for error messages.
_RESPONSES_FIELD = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class InputItem(BaseModel):
    """One input item: a message (``type`` "message" or absent) or a function call / its output."""

    model_config = _LOOSE

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesRequest(OpenAIRequest):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None  # {"format": {...}}
    stream: bool = False
    seed: int | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None  # refused: nothing is stored
    background: bool = False  # refused
    store: bool | None = None  # accepted; nothing is stored either way
    user: str | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as chat completions (a 400 naming the Responses field when it cannot be)."""
        if self.previous_response_id is not None:
            raise APIError(
                "previous_response_id is not supported: this server stores no responses; send the whole "
                "conversation as input",
                param="previous_response_id",
            )
        if self.background:
            raise APIError("background responses are not supported", param="background")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(),
            "max_tokens": self.max_output_tokens,
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.tools:
            body["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            body["response_format"] = _chat_response_format(fmt)
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            path = [str(part) for part in error["loc"]]
            path[:1] = [_RESPONSES_FIELD.get(path[0], path[0])] if path else []
            raise APIError(f"{'.'.join(path)}: {error['msg']}", param=".".join(path) or None) from None

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        if not self.input:
            raise APIError("input must not be empty", param="input")
        for i, item in enumerate(self.input):
            if item.type == "message":
                if item.role is None:
                    raise APIError("a message item needs a role", param=f"input.{i}.role")
                messages.append({"role": item.role, "content": _text(item.content, f"input.{i}.content")})
            elif item.type == "function_call":
                if not (item.call_id and item.name and item.arguments is not None):
                    raise APIError(
                        "a function_call item needs call_id, name and arguments", param=f"input.{i}"
                    )
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif item.type == "function_call_output":
                if not item.call_id or item.output is None:
                    raise APIError("a function_call_output item needs call_id and output", param=f"input.{i}")
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                raise APIError(f"input item type {item.type!r} is not supported", param=f"input.{i}.type")
        return messages


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.get("type") not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise APIError(
                f"content part type {part.get('type')!r} is not supported (text only)", param=f"{where}.{j}"
            )
        texts.append(part["text"])
    return "".join(texts)


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(
            f"tool type {tool.get('type')!r} is not supported (function tools only)", param=f"tools.{i}.type"
        )
    function = {
        k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
    }
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _chat_response_format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError("text.format type must be text, json_object or json_schema", param="text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    keys = ("name", "description", "schema", "strict")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if fmt.get(k) is not None}}
