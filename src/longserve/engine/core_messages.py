"""Every message between an engine core process and its client, as msgspec structs (MessagePack on the wire).

Requests go in tokenized and validated; outputs come back as deltas, one ``StepOutputs`` per engine step for
every request the step touched (never one message per token, never the cumulative text again).
"""

from __future__ import annotations

import msgspec

from longserve.engine.request import RequestLimits
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import TokenLogprob

# ---- client -> core ---------------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt: str | None  # the text, when the prompt was text (returned in outputs)
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str


class EmbedCall(msgspec.Struct, tag=True):
    call_id: int
    token_lists: list[list[int]]


class Shutdown(msgspec.Struct, tag=True):
    pass


ToCore = AddRequest | AbortRequest | EmbedCall | Shutdown

# ---- core -> client ---------------------------------------------------------------------------------------


class CoreReady(msgspec.Struct, tag=True):
    limits: RequestLimits
    quantization: str | None  # what the matmuls run, as LLMEngine.quantization


class CoreFailed(msgspec.Struct, tag=True):
    """The engine could not be built (the client raises ``error_type`` with ``message``)."""

    error_type: str  # "ModelLoadError", "ValueError" or another exception's name
    message: str


class CompletionDelta(msgspec.Struct):
    index: int
    text: str  # new text since the previous output
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


class OutputDelta(msgspec.Struct):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the request's first output only
    num_cached_tokens: int = 0


class EngineStats(msgspec.Struct):
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of usable KV blocks held by sequences
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache since the engine started
    prefix_cache_hits: int = 0  # of those, found cached


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[OutputDelta]
    stats: EngineStats


class EmbedDone(msgspec.Struct, tag=True):
    call_id: int
    embeddings: list[list[float]] | None = None
    error_type: str | None = None  # "ValueError" (a bad input), "CacheBusyError" (retry later), other
    message: str | None = None


FromCore = CoreReady | CoreFailed | StepOutputs | EmbedDone


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def to_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(ToCore)


def from_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(FromCore)
