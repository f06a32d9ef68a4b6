"""RequestOutput / CompletionOutput: a finished request as the offline API (``LLM``) returns it, built from
the engine's token deltas by ``OutputBuilder``."""

from __future__ import annotations

from dataclasses import dataclass, field

from longserve.engine.detokenizer import TokenDecoder
from longserve.engine.output_processor import RequestText
from longserve.engine.protocol import EngineRequest, RequestDelta, TokenLogprob


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # all text
    token_ids: list[int]  # all output token ids
    logprobs: list[TokenLogprob] | None = None  # per output token, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort"
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
    # Set when the request failed (sampling or its forward pass); its completions then end with
    # finish_reason "abort". Other requests of the same batch are unaffected.
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class OutputBuilder:
    """Collects one request's deltas as text into its ``RequestOutput``."""

    tokenizer: TokenDecoder
    request: EngineRequest
    prompt: str | None = None
    text: RequestText = field(init=False)
    output_: RequestOutput = field(init=False)
    pieces: list[list[str]] = field(init=False)  # per completion, joined once at the end

    def __post_init__(self) -> None:
        params = self.request.params
        # The text is read once, from output(): no decode per token unless stop strings need one.
        self.text = RequestText(self.tokenizer, self.request.prompt_token_ids, params, stream_text=False)
        wants_logprobs = params.logprobs is not None
        completions = [CompletionOutput(i, "", [], [] if wants_logprobs else None) for i in range(params.n)]
        self.pieces = [[] for _ in range(params.n)]
        self.output_ = RequestOutput(
            self.request.request_id, self.prompt, self.request.prompt_token_ids, completions, False
        )

    def add(self, delta: RequestDelta) -> list[int]:
        """Apply one delta; returns the completions a stop string ended (abort them in the engine)."""
        out = self.output_
        pieces, stopped = self.text.apply(delta)
        for piece in pieces:
            completion = out.outputs[piece.index]
            self.pieces[piece.index].append(piece.text)
            completion.token_ids.extend(piece.token_ids)
            if completion.logprobs is not None and piece.logprobs:
                completion.logprobs.extend(piece.logprobs)
            if piece.finish_reason is not None:
                completion.finish_reason, completion.stop_reason = piece.finish_reason, piece.stop_reason
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        out.num_cached_tokens = delta.num_cached_tokens
        out.error = delta.error or out.error
        out.finished = self.text.done
        return stopped

    def output(self) -> RequestOutput:
        for completion, pieces in zip(self.output_.outputs, self.pieces, strict=True):
            completion.text = "".join(pieces)
        return self.output_
