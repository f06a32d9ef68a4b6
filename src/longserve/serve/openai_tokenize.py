"""POST /tokenize and /detokenize in vLLM's shapes: a prompt or chat messages to token ids (with the context
length, for clients such as lm-eval's remote tokenizer), and token ids back to text; with the model's own
tokenizer, here in the front end."""

from __future__ import annotations

from fastapi.responses import Response
from pydantic import BaseModel

from longserve.serve.errors import APIError
from longserve.serve.openai_common import json_response
from longserve.serve.protocol import ChatMessage, OpenAIRequest, TokenId, template_messages
from longserve.serve.upstream import Upstream


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
    frontend = await upstream.frontend(req.model)
    text, special = req.prompt, req.add_special_tokens
    if req.messages is not None:
        messages = template_messages(req.messages)
        text, special = await frontend.render_chat(messages, req.add_generation_prompt), bool(special)
    ids = await frontend.encode(text, True if special is None else special)
    strs = None
    if req.return_token_strs:
        strs = [frontend.tokenizer.id_to_token(i) or "" for i in ids]
    result = TokenizeResult(
        count=len(ids), max_model_len=frontend.context_length, tokens=ids, token_strs=strs
    )
    return json_response(result)


async def detokenize(req: DetokenizeBody, upstream: Upstream) -> Response:
    frontend = await upstream.frontend(req.model)
    vocab = frontend.tokenizer.vocab_size
    unknown = [t for t in req.tokens if not 0 <= t < vocab]
    if unknown:
        raise APIError(f"token ids must be in [0, {vocab}); got {unknown[:5]}", param="tokens")
    return json_response(DetokenizeResult(prompt=frontend.tokenizer.decode(list(req.tokens), False)))
