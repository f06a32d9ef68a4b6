"""Token deltas -> ``WorkerStreamChunk``s: one request's text, logprob token texts, finish and usage, step by
step. The API server's front end runs it for every request it streams from an engine; the worker's own HTTP
generate endpoints run the same one for their clients (torch-free; the tokenizer decodes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from longserve.engine.output_processor import RequestText, TextPiece
from longserve.engine.protocol import EngineRequest, RequestDelta, TokenLogprob
from longserve.engine.sampling_params import SamplingParams
from longserve.serve.worker_protocol import (
    CompletionDelta,
    ErrorInfo,
    SamplingOptions,
    TokenLogprobInfo,
    TopLogprob,
    Usage,
    WorkerStreamChunk,
)

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# First words of the engine's request-validation messages that name the request field at fault.
_REQUEST_FIELDS = frozenset({"prompt", "request_id", "messages", "model"})
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})  # pydantic's union member names


def rejection_info(exc: ValueError, default_param: str | None = None) -> ErrorInfo:
    """A 400 for a ValueError from SamplingParams or a limit check; their messages start with the field's name."""
    message = str(exc)
    first_word = message.split(" ", 1)[0]
    param = first_word if first_word in _SAMPLING_FIELDS | _REQUEST_FIELDS else default_param
    code = None
    if "maximum context length" in message or "tokens of KV cache" in message:
        code = "context_length_exceeded"
    return ErrorInfo(message=message, param=param, code=code)


def invalid_body(errors: Sequence[Any]) -> ErrorInfo:
    """A 400 for a body that does not parse as the endpoint's model (FastAPI would answer 422 in its own shape)."""
    first = errors[0] if errors else {}
    # loc is ("body", field, ..., [union member tag such as "list[int]"], [list index]): keep the field path.
    path = [
        part
        for part in first.get("loc", ())
        if isinstance(part, str) and part != "body" and part not in _TYPE_TAGS and "[" not in part
    ]
    message = f"{'.'.join(path) or 'body'}: {first.get('msg', 'invalid request body')}"
    return ErrorInfo(message=message, param=path[-1] if path else None)


def sampling_params(options: SamplingOptions) -> SamplingParams:
    """Build (and so validate) the engine's SamplingParams; a bad value raises ``ValueError``."""
    return SamplingParams(**options.model_dump())


class TokenTexts:
    """Each token id's own text (special tokens included), decoded once: logprob entries name their token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # bounded by the vocabulary

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def logprob(self, entry: TokenLogprob) -> TokenLogprobInfo:
        return TokenLogprobInfo(
            token_id=entry.token_id,
            token=self(entry.token_id),
            logprob=entry.logprob,
            top=[TopLogprob(token_id=t, token=self(t), logprob=lp) for t, lp in entry.top],
        )

    def logprobs(self, entries: list[TokenLogprob] | None) -> list[TokenLogprobInfo] | None:
        return None if entries is None else [self.logprob(e) for e in entries]


class ChunkBuilder:
    """One request's deltas as stream chunks: ``chunk(delta)`` for each, in order; the first one also carries
    the prompt line's fields. ``stopped`` lists the completions a stop string ended in the last delta (abort
    them in the engine)."""

    def __init__(self, token_texts: TokenTexts, request: EngineRequest) -> None:
        self.token_texts = token_texts
        self.request = request
        self.text = RequestText(token_texts.tokenizer, request.prompt_token_ids, request.params)
        self.first = True
        self.stopped: list[int] = []

    def prompt_chunk(self, delta: RequestDelta) -> WorkerStreamChunk:
        """The stream's first line: the prompt's token ids and, when asked, its logprobs and token texts."""
        request, texts = self.request, self.token_texts
        wants = request.params.prompt_logprobs is not None
        prompt_logprobs = None
        if wants and delta.prompt_logprobs is not None:
            prompt_logprobs = [None if e is None else texts.logprob(e) for e in delta.prompt_logprobs]
        return WorkerStreamChunk(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            prompt_token_texts=[texts(t) for t in request.prompt_token_ids] if wants else None,
        )

    def chunk(self, delta: RequestDelta) -> WorkerStreamChunk | None:
        """This delta's news (None when it says nothing new); the final chunk has ``finished`` and usage."""
        pieces, self.stopped = self.text.apply(delta)
        outputs = [self._delta(p) for p in pieces if p.text or p.token_ids or p.finish_reason is not None]
        if self.text.done:
            usage = self.usage(delta.num_cached_tokens)
            return WorkerStreamChunk(
                request_id=self.request.request_id, outputs=outputs, finished=True, usage=usage
            )
        if not outputs:
            return None
        return WorkerStreamChunk(request_id=self.request.request_id, outputs=outputs)

    def usage(self, cached_tokens: int) -> Usage:
        prompt, completion = len(self.request.prompt_token_ids), sum(self.text.num_output_tokens)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=cached_tokens,
        )

    def _delta(self, piece: TextPiece) -> CompletionDelta:
        return CompletionDelta(
            index=piece.index,
            text=piece.text,
            token_ids=piece.token_ids,
            logprobs=self.token_texts.logprobs(piece.logprobs),
            finish_reason=piece.finish_reason,
            stop_reason=piece.stop_reason,
        )
