"""Function tools on /v1/chat/completions: checks on ``tools`` and ``tool_choice``, what the chat template and
the grammar get, and each choice's output turned into OpenAI tool calls, whole or streamed.

- ``auto``: the model writes free text in its own format; the model's tool parser (``tool_parsers/``) finds
  the calls.
- ``required``: a grammar makes the output a JSON array of ``{"name", "parameters"}`` objects, one of the
  tools each (as vLLM does), so the arguments always parse and match their schema.
- a named function: a grammar makes the output that function's arguments object.
- ``none``, or no tools: plain text; the template does not see the tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from longserve.engine.sampling_params import StructuredOutputParams
from longserve.serve.errors import APIError
from longserve.serve.protocol import ChatCompletionRequest
from longserve.serve.protocol_formats import (
    ChatTool,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCallDeltaInfo,
    ToolCallInfo,
)
from longserve.serve.structured_request import checked
from longserve.serve.tool_parsers import get_tool_parser
from longserve.serve.tool_parsers.base import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    make_tool_call_id,
)

ToolMode = Literal["none", "auto", "required", "named"]
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: ToolMode
    tools: list[ChatTool]
    template_tools: list[dict[str, Any]] | None  # what the chat template receives as ``tools``
    structure: StructuredOutputParams | None  # required / named: the grammar the output follows
    function: str | None  # the named function
    parallel: bool  # more than one call per answer allowed
    # A model without a tool format (generic_tools): the tools' description for the system message, and the
    # format the grammar makes its output follow.
    system_prompt: str | None = None
    parser: str | None = None

    def output(self, parser_name: str | None) -> ToolOutput:
        """A fresh output processor for one choice (``parser_name`` is the model's format, for ``auto``)."""
        parser = None
        parser_name = self.parser or parser_name
        if self.mode == "auto":
            assert parser_name is not None, "a model without a tool format gets generic_tool_plan"
            parser = get_tool_parser(parser_name)([t.function.name for t in self.tools])
        return ToolOutput(self, parser)


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    """Check ``tools`` / ``tool_choice`` (a 400 naming the field) and decide how the request uses them."""
    tools = req.tools or []
    names = [tool.function.name for tool in tools]
    for i, tool in enumerate(tools):
        if names.index(tool.function.name) != i:
            raise APIError(f"tools: function name {tool.function.name!r} appears twice", param=f"tools.{i}")
        if tool.function.parameters is not None:
            checked(
                StructuredOutputParams(json=json.dumps(tool.function.parameters)),
                f"tools.{i}.function.parameters",
            )
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError("tool_choice is only allowed when tools are given", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(
            f"tool_choice names function {choice.function.name!r}, which is not among the tools",
            param="tool_choice",
        )
    mode: ToolMode = "named" if isinstance(choice, NamedToolChoice) else choice
    structure = None
    if mode == "required":
        structure = StructuredOutputParams(json=json.dumps(_calls_schema(tools, req.parallel_tool_calls)))
    elif mode == "named":
        tool = tools[names.index(choice.function.name)]
        structure = StructuredOutputParams(
            json=json.dumps(closed_schema(tool.function.parameters or NO_ARGUMENTS))
        )
    if structure is not None and (req.response_format is not None and req.response_format.type != "text"):
        raise APIError(
            "response_format cannot be combined with tool_choice 'required' or a named function",
            param="response_format",
        )
    return ToolPlan(
        mode=mode,
        tools=tools,
        template_tools=[t.model_dump(by_alias=True, exclude_none=True) for t in tools]
        if mode != "none"
        else None,
        structure=structure,
        function=choice.function.name if isinstance(choice, NamedToolChoice) else None,
        parallel=req.parallel_tool_calls,
    )


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties and says
    nothing of others (OpenAI's strict mode): the grammar of a call's arguments then ends where the tool's
    parameters do, instead of letting a small model run on inventing keys until max_tokens."""
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _calls_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "parameters": closed_schema(t.function.parameters or NO_ARGUMENTS),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolOutput:
    """One choice's text -> content and tool calls: ``parse`` for a whole answer, ``feed``/``finish`` streamed."""

    def __init__(self, plan: ToolPlan, parser: ToolParser | None) -> None:
        self.plan = plan
        self._parser = parser
        self._stream = parser.stream() if parser is not None else None
        self._text = ""  # required / named: everything so far
        self._emitted = 0  # required: calls already streamed
        self._scanned = 0  # required: characters of _text holding those calls
        self._call_id = make_tool_call_id()  # named: its one call
        self.called = False  # some tool call was produced (finish_reason "tool_calls")

    @property
    def needs_special_tokens(self) -> bool:
        """The model's format marks calls with special tokens (kept in the text only when asked)."""
        return self._parser is not None and self._parser.needs_special_tokens

    def parse(self, text: str) -> ParsedOutput:
        if self.plan.mode == "auto":
            parsed = self._parser.parse(text)
            if not self.plan.parallel:
                parsed.tool_calls = parsed.tool_calls[:1]
        elif self.plan.mode == "named":
            parsed = ParsedOutput(None, [ToolCall(self._call_id, self.plan.function, text)])
        else:
            calls = _complete_calls(text, 0)[0]
            # Cut short (max_tokens): what parsed is kept; nothing parsed leaves the text as content.
            parsed = ParsedOutput(None if calls else text, calls)
        self.called = bool(parsed.tool_calls)
        return parsed

    def feed(self, delta: str) -> StreamDelta:
        if self.plan.mode == "auto":
            return self._keep_allowed(self._stream.feed(delta))
        if self.plan.mode == "named":
            first = not self._text
            self._text += delta
            if not delta and not first:
                return StreamDelta()
            self.called = True
            if first:
                call = ToolCallDelta(0, self._call_id, self.plan.function, delta)
            else:
                call = ToolCallDelta(0, arguments=delta)
            return StreamDelta(tool_calls=[call])
        self._text += delta
        calls, self._scanned = _complete_calls(self._text, self._scanned)
        out = StreamDelta()
        for call in calls:
            out.tool_calls.append(ToolCallDelta(self._emitted, call.id, call.name, call.arguments))
            self._emitted += 1
        self.called = self.called or bool(calls)
        return out

    def finish(self) -> StreamDelta:
        if self.plan.mode == "auto":
            return self._keep_allowed(self._stream.finish())
        if self.plan.mode == "required" and not self._emitted and self._text:
            return StreamDelta(content=self._text)  # cut short before any call completed
        return StreamDelta()

    def _keep_allowed(self, delta: StreamDelta) -> StreamDelta:
        if not self.plan.parallel:
            delta.tool_calls = [c for c in delta.tool_calls if c.index == 0]
        self.called = self.called or bool(delta.tool_calls)
        return delta


def _complete_calls(text: str, start: int) -> tuple[list[ToolCall], int]:
    """The calls of the JSON array ``text`` whose objects are complete after offset ``start``, and the offset
    just past the last of them. The grammar wrote the array, so it is well formed as far as it goes."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = start
    while True:
        while pos < len(text) and text[pos] in "[, \n\t":
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return calls, pos
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return calls, pos  # the object is still being written
        arguments = json.dumps(item.get("parameters", {}), ensure_ascii=False)
        calls.append(ToolCall(make_tool_call_id(), item["name"], arguments))
        pos = end


def tool_call_infos(calls: list[ToolCall]) -> list[ToolCallInfo]:
    return [ToolCallInfo(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def tool_call_delta_infos(deltas: list[ToolCallDelta]) -> list[ToolCallDeltaInfo]:
    """OpenAI's streamed shape: the first piece of a call has id, type and name; later ones argument text."""
    return [
        ToolCallDeltaInfo(
            index=d.index,
            id=d.id,
            type="function" if d.id is not None else None,
            function=FunctionCallDelta(name=d.name, arguments=d.arguments),
        )
        for d in deltas
    ]
