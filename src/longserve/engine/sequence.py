"""Sequence: one generation stream's tokens, progress through the model, KV blocks and stop state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from longserve.engine.protocol import TokenLogprob
from longserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class GrammarRejected(ValueError):
    """A request's grammar refused the token its own mask allowed: that grammar cannot go on."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"  # cancelled by the caller


@dataclass(eq=False, slots=True)
class Sequence:
    """One completion stream. ``num_computed_tokens`` counts tokens whose KV is in the cache.

    The scheduler moves ``num_computed_tokens`` toward ``num_tokens`` every step; prefill, decode and
    recompute after preemption are the same motion with different counts.
    """

    request_id: str
    seq_index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_total_tokens: int  # prompt + output may not exceed this (context length and max_tokens)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1  # the block table's row in its block manager's array (``BlockTableArray``); -1: none
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it (stop strings: the reader matches them)
    generator: torch.Generator | None = None  # per-request RNG when a seed is set
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_preemptions: int = 0
    first_token_time: float | None = None
    # Prefix caching: the cache keys of this sequence's leading full blocks (kv_cache.BlockKey), the prompt
    # tokens found cached when it was first scheduled, and for completion 1.. of an n > 1 request the
    # sequence that prefills the shared prompt first.
    block_keys: list = field(default_factory=list)
    num_cached_tokens: int = 0
    leader: Sequence | None = None
    # Structured output: this sequence's llguidance matcher, advanced with every token it accepts.
    grammar: Any = None
    # Overlapped steps: tokens sampled on the device that the host has not read back yet (they count in
    # num_tokens, so the scheduler can run the next step meanwhile), and the row of the newest one in its
    # step's sampled tokens (the next step feeds it from there).
    num_pending_tokens: int = 0
    pending_row: int = -1
    # Speculative decoding: tokens a proposer drafted to follow this sequence's last one, verified by the
    # next step (the scheduler may take fewer of them); emptied once the step is launched.
    draft_token_ids: list[int] = field(default_factory=list)
    # LoRA: the adapter this sequence runs with (its registration id; 0: the base model) and, while it runs,
    # the device slot holding it (-1: none).
    lora_id: int = 0
    lora_slot: int = -1
    # Sampling is the argmax and nothing else (``SamplingParams.plain_greedy``, fixed for the request): the
    # sampler's common step checks only this.
    plain_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.plain_greedy = self.params.plain_greedy
        if self.params.seed is not None:
            # Masked to 64 bits, as torch reads a negative seed: seed + index never overflows manual_seed.
            self.generator = torch.Generator().manual_seed((self.params.seed + self.seq_index) % 2**64)

    @property
    def num_tokens(self) -> int:
        """Every token so far, those still on the device included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far, those still on the device included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """The tokens the host holds: ``token_ids()``."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Known tokens ``start:end`` without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def append_token(self, token: int, logprob: TokenLogprob | None) -> FinishReason | None:
        """Take a sampled token (through the grammar, if any); why the sequence ends with it, or None.
        ``GrammarRejected`` if the grammar refuses it."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        params = self.params
        grammar_done = False
        if self.grammar is not None:
            if not self.grammar.consume_token(token):
                raise GrammarRejected(
                    f"structured output: the grammar rejected token {token}: {self.grammar.get_error()}"
                )
            grammar_done = self.grammar.is_stopped()  # complete, and nothing (not even EOS) may follow
        if token in self.eos_token_ids and (not params.ignore_eos or grammar_done):
            return FinishReason.STOP
        if token in params.stop_token_ids:
            self.stop_reason = token
            return FinishReason.STOP
        if grammar_done:
            return FinishReason.STOP
        if len(self.prompt_token_ids) + len(self.output_token_ids) >= self.max_total_tokens:  # (known tokens)
            return FinishReason.LENGTH
        return None
