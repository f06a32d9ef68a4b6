"""Translation between the engine's objects and the worker protocol: sampling options in, deltas and errors out."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from longserve.engine.outputs import CompletionOutput, RequestOutput
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import TokenLogprob
from longserve.loading.tokenizer import Tokenizer
from longserve.serve.worker_protocol import (
    CompletionDelta,
    ErrorInfo,
    SamplingOptions,
    TokenLogprobInfo,
    TopLogprob,
    Usage,
)

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# First words of the engine's request-validation messages that name the request field at fault.
_REQUEST_FIELDS = frozenset({"prompt", "request_id", "messages", "model"})
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})  # pydantic's union member names


class WorkerError(Exception):
    """A request the worker rejects; the app answers it with ``info.status`` and ``info`` as the body."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


def rejection(exc: ValueError, default_param: str | None = None) -> WorkerError:
    """A 400 for a ValueError from SamplingParams or the engine; their messages start with the field's name."""
    message = str(exc)
    first_word = message.split(" ", 1)[0]
    param = first_word if first_word in _SAMPLING_FIELDS | _REQUEST_FIELDS else default_param
    code = None
    if "maximum context length" in message or "tokens of KV cache" in message:
        code = "context_length_exceeded"
    return WorkerError(ErrorInfo(message=message, param=param, code=code))


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
    """Build (and so validate) the engine's SamplingParams; a bad value raises a 400 ``WorkerError``."""
    try:
        return SamplingParams(**options.model_dump())
    except ValueError as exc:
        raise rejection(exc) from exc


class OutputConverter:
    """RequestOutput -> CompletionDelta/Usage/logprob infos, with token texts decoded once per token id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}  # bounded by the vocabulary

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            # Special tokens too: a logprob entry must say which token it is even if the text hides it.
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def logprob(self, entry: TokenLogprob) -> TokenLogprobInfo:
        return TokenLogprobInfo(
            token_id=entry.token_id,
            token=self.token_text(entry.token_id),
            logprob=entry.logprob,
            top=[TopLogprob(token_id=t, token=self.token_text(t), logprob=lp) for t, lp in entry.top],
        )

    def logprobs(self, entries: list[TokenLogprob] | None) -> list[TokenLogprobInfo] | None:
        return None if entries is None else [self.logprob(e) for e in entries]

    def prompt_logprobs(
        self, entries: list[TokenLogprob | None] | None
    ) -> list[TokenLogprobInfo | None] | None:
        if entries is None:
            return None
        return [None if e is None else self.logprob(e) for e in entries]

    def deltas(self, output: RequestOutput, finished_indices: set[int]) -> list[CompletionDelta]:
        """This output's news per completion: new text/tokens, or a finish not reported yet.

        ``finished_indices`` remembers across calls which completions' finish was already sent (a finished
        completion stays in every later output of an ``n > 1`` request).
        """
        deltas = []
        for c in output.outputs:
            newly_finished = c.finish_reason is not None and c.index not in finished_indices
            if not (c.delta_text or c.delta_token_ids or newly_finished):
                continue
            if newly_finished:
                finished_indices.add(c.index)
            deltas.append(
                CompletionDelta(
                    index=c.index,
                    text=c.delta_text,
                    token_ids=list(c.delta_token_ids),
                    logprobs=self.logprobs(c.delta_logprobs),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        return deltas

    def completions(self, output: RequestOutput) -> list[CompletionDelta]:
        """Every completion whole (the cumulative fields of a final output)."""
        return [self._whole(c) for c in output.outputs]

    def _whole(self, c: CompletionOutput) -> CompletionDelta:
        return CompletionDelta(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            logprobs=self.logprobs(c.logprobs),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    @staticmethod
    def usage(output: RequestOutput) -> Usage:
        prompt, completion = output.num_prompt_tokens, output.num_generated_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=output.num_cached_tokens,
        )
