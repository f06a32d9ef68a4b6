"""OpenAI request shapes for constrained output: ``response_format`` and function tools (``tools``,
``tool_choice``). Plain pydantic models; what they mean for generation lives in ``structured_request.py`` and
``openai_tools.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Every request-side model: no "4" for 4, no "yes" for true, no NaN or Infinity (as protocol.STRICT).
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", populate_by_name=True)
# OpenAI's rule for function and schema names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # "schema" would shadow BaseModel.schema(); the wire name stays "schema".
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted; the grammar enforces the schema either way


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema for the arguments object; None: no arguments
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = _STRICT

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCallInfo(BaseModel):
    """A tool call in an assistant message (answers) and in the messages a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str | None = Field(None, exclude_if=lambda v: v is None)


class ToolCallDeltaInfo(BaseModel):
    """One streamed piece of a tool call: the first carries id, type and name, later ones argument text."""

    index: int
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: FunctionCallDelta
