"""POST /tokenize and /detokenize in vLLM's shapes: a prompt or chat messages to token ids (with the context
length, for clients such as lm-eval's remote tokenizer), and token ids back to text."""

from __future__ import annotations

from fastapi.responses import Response
from pydantic import BaseModel

from longserve.serve.errors import APIError
from longserve.serve.openai_common import json_response
from longserve.serve.protocol import ChatMessage, OpenAIRequest, TokenId, template_messages
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import (
    ChatTemplateRequest,
    ChatTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


class TokenizeBody(OpenAIRequest):
    """Exactly one of ``prompt`` (text) or ``messages`` (rendered by the model's chat template first)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # messages only
    # Default: True for a prompt; False for messages, whose template writes its own special tokens (as vLLM).
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class TokenizeResult(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeBody(OpenAIRequest):
    model: str
    tokens: list[TokenId]


class DetokenizeResult(BaseModel):
    prompt: str


async def tokenize(req: TokenizeBody, upstream: Upstream) -> Response:
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give exactly one of prompt or messages", param="prompt")
    text, special = req.prompt, req.add_special_tokens
    if req.messages is not None:
        template = await upstream.call_worker(
            req.model,
            "/apply_chat_template",
            ChatTemplateRequest(
                model=req.model,
                messages=template_messages(req.messages),
                add_generation_prompt=req.add_generation_prompt,
            ),
            ChatTemplateResponse,
        )
        text, special = template.prompt, bool(special)
    body = TokenizeRequest(
        model=req.model,
        prompt=text,
        add_special_tokens=True if special is None else special,
        return_token_strs=req.return_token_strs,
    )
    result = await upstream.call_worker(req.model, "/tokenize", body, TokenizeResponse)
    return json_response(
        TokenizeResult(
            count=len(result.tokens),
            max_model_len=result.max_model_len,
            tokens=result.tokens,
            token_strs=result.token_strs,
        )
    )


async def detokenize(req: DetokenizeBody, upstream: Upstream) -> Response:
    body = DetokenizeRequest(model=req.model, tokens=list(req.tokens))
    result = await upstream.call_worker(req.model, "/detokenize", body, DetokenizeResponse)
    return json_response(DetokenizeResult(prompt=result.prompt))
