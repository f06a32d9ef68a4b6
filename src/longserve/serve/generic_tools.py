"""Tool calling for a model whose chat template has no tool format (the default model, many small or base
models), as llama-server's generic format does: the tools are described to the model in a system message,
earlier calls and results are written into the conversation as text, and for ``auto`` the output is
constrained to either plain text or Hermes-style calls (``<tool_call>{"name", "arguments"}</tool_call>``)
whose JSON follows the tools' schemas, which the ``hermes`` parser then reads, whole or streamed.
``required`` and a named function keep their own grammars (``openai_tools``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from longserve.engine.sampling_params import StructuredOutputParams
from longserve.serve.errors import APIError
from longserve.serve.openai_tools import NO_ARGUMENTS, ToolPlan, closed_schema
from longserve.serve.protocol import ChatCompletionRequest

GENERIC_PARSER = "hermes"


def generic_tool_plan(plan: ToolPlan, req: ChatCompletionRequest) -> ToolPlan:
    """``plan`` for a model without a tool format: the tools go into a system message instead of the
    template, and ``auto`` gets the text-or-calls grammar."""
    structure = plan.structure
    if plan.mode == "auto":
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(
                "response_format cannot be combined with tools on a model without a tool-call format",
                param="response_format",
            )
        structure = StructuredOutputParams(grammar=_text_or_calls_grammar(plan))
    return dataclasses.replace(
        plan,
        template_tools=None,
        structure=structure,
        system_prompt=_tools_prompt(plan),
        parser=GENERIC_PARSER,
    )


def generic_messages(messages: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    """The conversation for a template that knows no tools: the tools' description joins the system
    message; assistant calls become their text, and tool results user turns."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "".join(_call_text(call) for call in message["tool_calls"])
            out.append({"role": "assistant", "content": content + calls})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({**message, "content": content})
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system_prompt}"}
    else:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>{body}</tool_call>"


def _tools_prompt(plan: ToolPlan) -> str:
    described = [
        {"name": t.function.name, "description": t.function.description or "",
         "parameters": t.function.parameters or NO_ARGUMENTS}
        for t in plan.tools
    ]  # fmt: skip
    how = {
        "auto": 'To call a tool, answer with <tool_call>{"name": <tool name>, "arguments": <arguments>}'
        "</tool_call>"
        + (" (one block per call)" if plan.parallel else " (one call at most)")
        + "; otherwise answer in plain text.",
        "required": "Answer with the tool calls to make, as JSON.",
        "named": f"Answer with the arguments for {plan.function}, as JSON.",
    }[plan.mode]
    return f"You can use these tools:\n{json.dumps(described, ensure_ascii=False)}\n{how}"


def _text_or_calls_grammar(plan: ToolPlan) -> str:
    """Lark for llguidance: plain text not starting with ``<``, or one or more calls of the tools."""
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": closed_schema(t.function.parameters or NO_ARGUMENTS),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in plan.tools
        ]
    }
    calls = "call+" if plan.parallel else "call"
    return (
        f"start: TEXT | calls\ncalls: {calls}\n"
        f'call: "<tool_call>" %json {json.dumps(one_call)} "</tool_call>"\n'
        "TEXT: /[^<][\\s\\S]*/\n"
    )
