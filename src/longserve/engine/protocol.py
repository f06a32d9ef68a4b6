"""Everything that crosses the engine boundary, torch-free: the engine core's messages (msgspec structs,
MessagePack on the wire), the limits a request is checked against, and the errors both sides raise.

Requests go in tokenized and validated; what comes back is token deltas, one ``StepOutputs`` per engine step
carrying every request the step advanced: its new token ids (logprobs when asked) and its finish. Text, stop
strings and cumulative outputs are the reader's business (``output_processor``), never the core's.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from longserve.engine.sampling_params import SamplingParams
from longserve.loading.pooling_config import MEAN_NORMALIZED, PoolingConfig
from longserve.loading.tokenizer import TokenizerSpec

# ---- errors -----------------------------------------------------------------------------------------------


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (sampling, its forward pass, a dead core, shutdown).
    ``client_error``: the request's own doing (its grammar cannot go on), answered as a 400."""

    def __init__(self, message: str, client_error: bool = False) -> None:
        super().__init__(message)
        self.client_error = client_error


class EngineShutDown(RequestFailed):
    """The engine is stopping (or stopped): the request was cut short or never started; another may serve it."""


class CacheBusyError(RuntimeError):
    """The KV cache has too few free blocks right now (running requests hold them); retrying later may work."""


# ---- what a request may ask ---------------------------------------------------------------------------------


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

    def check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` (worded to start with the field to blame) unless the engine can run it."""
        if not self.can_generate:
            raise ValueError(
                "model is an embedding model (no output head): it cannot generate text; use /v1/embeddings"
            )
        if not token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        biased = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if biased:
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {biased[:5]}")
        limit = self.context_length
        requested = len(token_ids) + (params.max_tokens or 1)
        if requested > limit:
            raise ValueError(
                f"this model's maximum context length is {limit} tokens, but the request needs {requested} "
                f"({len(token_ids)} in the prompt, {params.max_tokens or 1} for the completion)"
            )


# The per-token structs below are made for every sequence in every step and hold only data (no reference can
# lead back to them), so the cyclic collector does not track them (``gc=False``): fewer collections per step.
class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    """Logprob of one chosen token plus the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


# ---- client -> core ---------------------------------------------------------------------------------------


class EngineRequest(msgspec.Struct, tag=True, array_like=True):
    """A request as the engine takes it: already tokenized, its params validated (``check_prompt``)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None  # a LoRA adapter the engine has loaded; None: the base model


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    seq_index: int | None = None  # one completion of an n > 1 request (a stop string matched); None: all


class EmbedCall(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    token_lists: list[list[int]]


class LoRACall(msgspec.Struct, tag=True, array_like=True):
    """Load LoRA adapter ``name`` from the PEFT directory ``path``, or (``path`` None) unload it."""

    call_id: int
    name: str
    path: str | None = None


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


ToCore = EngineRequest | AbortRequest | EmbedCall | LoRACall | Shutdown

# ---- core -> client ---------------------------------------------------------------------------------------


class CoreReady(msgspec.Struct, tag=True, array_like=True):
    limits: RequestLimits
    quantization: str | None  # what the matmuls run, as LLMEngine.quantization
    tokenizer: TokenizerSpec  # the model's: the client needs no checkpoint (nor torch) of its own


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The engine could not be built (the client raises ``error_type`` with ``message``)."""

    error_type: str  # "ModelLoadError", "ValueError" or another exception's name
    message: str


class SequenceDelta(msgspec.Struct, array_like=True, gc=False):
    """What one step added to one completion: its new tokens and, at the end, why it finished."""

    index: int  # which of the request's n completions
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that matched (stop strings are matched by the reader)


class RequestDelta(msgspec.Struct, array_like=True, gc=False):
    """One request's news from one step."""

    request_id: str
    seqs: list[SequenceDelta]
    finished: bool = False  # every completion has finished; nothing more follows
    # Set on the last delta of a request that failed (sampling or its forward pass); its completions end
    # with finish_reason "abort". Other requests of the same step are unaffected.
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, in the first delta that has them
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    client_error: bool = False  # the error is the request's own doing (its grammar), not the engine's


class SpecDecodeStats(msgspec.Struct):
    """Speculative decoding's running totals since the engine started (vLLM's ``spec_decode`` counters)."""

    num_drafts: int = 0  # verifications: a sequence's drafts checked in one step
    num_draft_tokens: int = 0  # tokens drafted
    num_accepted_tokens: int = 0  # of those, accepted
    accepted_per_position: list[int] = msgspec.field(default_factory=list)  # accepted at draft position i


class EngineStats(msgspec.Struct):
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of usable KV blocks held by sequences
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache since the engine started
    prefix_cache_hits: int = 0  # of those, found cached
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
    # LoRA adapters with running / waiting sequences (names, sorted), and the device slots; 0: LoRA is off
    running_loras: list[str] = msgspec.field(default_factory=list)
    waiting_loras: list[str] = msgspec.field(default_factory=list)
    max_loras: int = 0


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[RequestDelta]
    stats: EngineStats


class EmbedDone(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    embeddings: list[list[float]] | None = None
    error_type: str | None = None  # "ValueError" (a bad input), "CacheBusyError" (retry later), other
    message: str | None = None


class LoRADone(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    error: str | None = None  # why the adapter could not be loaded or unloaded (the caller's 400)


FromCore = CoreReady | CoreFailed | StepOutputs | EmbedDone | LoRADone


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def to_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(ToCore)


def from_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(FromCore)
