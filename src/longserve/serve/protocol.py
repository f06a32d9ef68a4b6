"""OpenAI API shapes as pydantic models: requests (validated, with OpenAI's ranges), responses, stream chunks.

Requests accept OpenAI's fields plus vLLM's sampling extensions (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, skip_special_tokens, ...). Unknown fields are ignored, as vLLM does, so newer clients
keep working. Types are strict, as OpenAI's: ``"stream": "yes"`` or ``"max_tokens": "4"`` is an error, and so
are NaN and infinities; text must be valid Unicode (a lone UTF-16 surrogate such as ``"\udfff"`` is rejected
before it reaches a worker). A value out of range fails validation, which the API server answers with 400
naming the field. Checks that involve several fields or features we do not serve live in ``check()`` and raise
``APIError``; fields we only accept to reject them (``best_of``, ``suffix``, ...) are left out of the schema.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from longserve.engine.sampling_params import REPETITION_PENALTY_RANGE, SEED_RANGE
from longserve.serve.errors import APIError
from longserve.serve.protocol_formats import (
    ChatTool,
    ResponseFormat,
    ToolCallDeltaInfo,
    ToolCallInfo,
    ToolChoice,
)

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for (OpenAI's chat limit, vLLM's default)
MAX_N = 128  # completions per prompt; more is almost surely a mistake and would hold the KV cache hostage

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- requests ----------------------------------------------------------------------------------------------

# Every request-side model: no "4" for 4, no "yes" for true, no NaN or Infinity.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def check_unicode(value: Any, path: str = "") -> None:
    """Raise a 400 naming the field if any string (or key) in ``value`` holds a lone surrogate.

    JSON's ``"\udfff"`` escape decodes to such a string; it cannot be encoded as UTF-8, so the tokenizer, the
    worker protocol and the JSON answer (which echoes some fields) would all fail on it later.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = path or "body"
            raise APIError(
                f"{where}: the text holds a lone UTF-16 surrogate ({value[exc.start]!r} at {exc.start}), "
                "which is not valid Unicode",
                param=path or None,
                code="invalid_unicode",
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, f"{path}.{i}" if path else str(i))


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False  # one more chunk before [DONE]: usage for the whole request, no choices


class OpenAIRequest(BaseModel):
    """Base of the request bodies: unknown fields ignored, null read as "not given", strict types."""

    model_config = ConfigDict(extra="ignore", **STRICT)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # An APIError raised here is not a ValueError, so pydantic lets it through to the app's handler.
        check_unicode(data)
        # Many clients send every optional field, unset ones as null; OpenAI reads null as "not given".
        # max_tokens keeps its null: for completions it means "up to the context length", not 16.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k == "max_tokens"}
        return data


class SamplingRequest(OpenAIRequest):
    """Fields chat and completions share: the model, sampling, stopping and streaming."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    # None means "the default": OpenAI's temperature/top_p default is 1, and the worker's defaults match.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's) -> bias, clamped to ±100
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; not used
    # Constrained output (structured_request.py): OpenAI's response_format or one of vLLM's guided_* options.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None  # a JSON schema
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark or llama.cpp GBNF

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        if self.logit_bias and not all(key.isdigit() for key in self.logit_bias):
            raise APIError("logit_bias keys must be token ids (decimal integers)", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; extra keys (tool_calls, tool_call_id, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def flat_content(self, where: str) -> str:
        """Content as one string; text parts are joined, other part types are not served (no vision)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise APIError(
                    f"content part type {part.type!r} is not supported (text only)",
                    param=f"{where}.content.{j}.type",
                )
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context length
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True  # vLLM extension: end the rendered prompt with the assistant's turn
    # vLLM extension: more variables for the chat template, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        reserved = sorted(set(self.chat_template_kwargs or {}) & _TEMPLATE_OWN)
        if reserved:
            raise APIError(
                f"chat_template_kwargs may not set {reserved}: the request's own fields do",
                param="chat_template_kwargs",
            )

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)


# Template variables the request sets itself (chat_template_kwargs may not).
_TEMPLATE_OWN = {
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: plain dicts with string content."""
    out = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = message.flat_content(f"messages.{i}")
        if isinstance(item.get("tool_calls"), list):
            item["tool_calls"] = [_template_tool_call(call) for call in item["tool_calls"]]
        out.append(item)
    return out


def _template_tool_call(call: Any) -> Any:
    """A tool call the client sends back, with its ``arguments`` JSON text as an object: templates write it
    with ``tojson`` (Qwen, Llama, Hermes), which would otherwise quote the text a second time (as vLLM does)."""
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            return call
        if isinstance(arguments, dict):
            return {**call, "function": {**function, "arguments": arguments}}
    return call


CompletionPrompt = str | list[TokenId] | list[list[TokenId]] | list[str]


class CompletionRequest(SamplingRequest):
    prompt: CompletionPrompt
    # OpenAI's default; 0 is allowed (with echo it scores the prompt); None: up to the context length.
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: SkipJsonSchema[str | None] = None  # rejected in check()
    best_of: SkipJsonSchema[int | None] = Field(None, ge=1)  # only best_of == n is served

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of is not supported (other than best_of == n)", param="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError("prompt must not be empty", param="prompt")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise APIError("a token-id prompt must not be empty", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # one tokenized prompt
        return list(self.prompt)


class EmbeddingRequest(OpenAIRequest):
    model: str
    input: str | list[TokenId] | list[list[TokenId]] | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    # Matryoshka-style: the first `dimensions` components, renormalised if the model normalises; the upper
    # bound (the model's embedding size) is checked by the worker.
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            items: list[str | list[int]] = [self.input]
        elif self.input and all(isinstance(t, int) for t in self.input):
            items = [list(self.input)]
        else:
            items = list(self.input)
        if not items:
            raise APIError("input must not be empty", param="input")
        for item in items:
            if len(item) == 0:
                raise APIError("input must not contain empty strings or token lists", param="input")
        if len(items) > 2048:
            raise APIError("input may hold at most 2048 items", param="input")
        return items


# ---- responses ---------------------------------------------------------------------------------------------


def _none(value: object) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # present when some prompt tokens were cached


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "longserve"
    root: str | None = None  # vLLM's: the base model (for an adapter, the model it adapts)
    parent: str | None = None  # vLLM's: a LoRA adapter's base model; None for a base model
    max_model_len: int | None = None  # prompt + completion tokens a request may have (vLLM's field)
    # What /v1/embeddings gives for this model (longserve's fields; None when its workers do not say).
    pooling: Literal["cls", "mean", "last"] | None = None  # pooled: the first token, the mean, the last token
    embedding_dimensions: int | None = None  # an embedding's length: the most ``dimensions`` may ask for
    normalized_embeddings: bool | None = None  # L2-normalised
    embedding_only: bool | None = None  # an embedding checkpoint: it cannot generate (those requests get 400)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=_none)  # a reasoning model's thinking (vLLM's)
    tool_calls: list[ToolCallInfo] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extension: the stop string or token id that matched


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_none)
    content: str | None = Field(None, exclude_if=_none)
    reasoning_content: str | None = Field(None, exclude_if=_none)
    tool_calls: list[ToolCallDeltaInfo] | None = Field(None, exclude_if=_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, exclude_if=_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_none)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, exclude_if=_none)


class CompletionResponse(BaseModel):
    """Both the whole response and a stream chunk (OpenAI uses object "text_completion" for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_none)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo
