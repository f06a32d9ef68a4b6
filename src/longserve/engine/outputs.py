"""RequestOutput / CompletionOutput: what the engine hands back per request, cumulative plus this step's delta."""

from __future__ import annotations

from dataclasses import dataclass, field

from longserve.engine.sequence import TokenLogprob


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # all text so far
    token_ids: list[int]  # all output token ids so far
    delta_text: str = ""  # text new since the previous output for this request
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # per output token, when requested
    delta_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None (nothing predicts token 0)
    # Set on the last output of a request that failed (sampling, detokenizing or its forward pass); its
    # completions then end with finish_reason "abort". Other requests of the same step are unaffected.
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
