"""Request: a validated prompt with its settings and the n sequences that generate for it; built (tokenized and
checked against the engine's limits) the same way in the engine and in the engine core's clients."""

from __future__ import annotations

import time
from dataclasses import dataclass

from longserve.engine.detokenizer import IncrementalDetokenizer
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence
from longserve.loading.pooling_config import MEAN_NORMALIZED, PoolingConfig


@dataclass
class RequestLimits:
    """What a request may ask of an engine."""

    vocab_size: int  # prompt token ids must be below it
    max_model_len: int  # prompt + completion, the model's limit
    cache_capacity: int  # tokens the whole KV cache holds
    eos_token_ids: list[int]
    can_generate: bool = True  # False: an embedding-only checkpoint; only embeddings may be asked of it
    embedding_size: int = 0  # components of an embedding (the hidden size): the most ``dimensions`` may ask
    pooling: PoolingConfig = MEAN_NORMALIZED  # how embeddings are pooled, and whether they are L2-normalised

    @property
    def context_length(self) -> int:
        """Longest prompt + completion a request may have: the model's limit or the whole KV cache."""
        return min(self.max_model_len, self.cache_capacity)


@dataclass
class Request:
    """A validated request: its prompt, settings and the n sequences that generate for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float
    reported_tokens: list[int]  # per sequence: output tokens already handed out
    reported_text: list[int]  # per sequence: characters of text already handed out
    reported_logprobs: list[int]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def build_request(
    tokenizer,
    limits: RequestLimits,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    *,
    add_special_tokens: bool = True,  # False for chat-template output, which carries its own BOS
    prompt_token_ids: list[int] | None = None,  # the text's ids, already encoded (the engine core's input)
) -> Request:
    """Tokenize and validate; a bad prompt, a request over the context length or any generation request to an
    embedding-only model raises ``ValueError``."""
    if not limits.can_generate:
        # Worded to start with the field to blame (the worker's 400 names it).
        raise ValueError(
            "model is an embedding model (no output head): it cannot generate text; use /v1/embeddings"
        )
    params = params or SamplingParams()
    if isinstance(prompt, str):
        text = prompt
        token_ids = (
            list(prompt_token_ids)
            if prompt_token_ids is not None
            else tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        )
    else:
        text, token_ids = None, list(prompt)
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < limits.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {limits.vocab_size}), got {bad[:5]}")
    if not token_ids:
        raise ValueError("prompt must not be empty")
    limit = limits.context_length
    requested = len(token_ids) + (params.max_tokens or 1)
    if requested > limit:
        raise ValueError(
            f"this model's maximum context length is {limit} tokens, but the request needs {requested} "
            f"({len(token_ids)} in the prompt, {params.max_tokens or 1} for the completion)"
        )
    max_total = limit if params.max_tokens is None else len(token_ids) + params.max_tokens
    eos_ids = frozenset(limits.eos_token_ids)
    seqs = [
        Sequence(request_id, i, token_ids, params, eos_token_ids=eos_ids, max_total_tokens=max_total)
        for i in range(params.n)
    ]
    for seq in seqs[1:]:
        seq.leader = seqs[0]
    detokenizers = [
        IncrementalDetokenizer(
            tokenizer,
            token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        for _ in seqs
    ]
    zeros = [0] * params.n
    return Request(
        request_id,
        text,
        token_ids,
        params,
        seqs,
        detokenizers,
        time.monotonic(),
        zeros,
        list(zeros),
        list(zeros),
    )
