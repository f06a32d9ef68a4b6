"""Request: a validated prompt with its settings and the n sequences that generate for it (the engine's side)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from longserve.engine.protocol import EngineRequest, RequestDelta, RequestLimits, SequenceDelta
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class Request:
    """The engine's state of one request; ``reported_*`` say how much of each sequence was handed out."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    reported_tokens: list[int] = field(default_factory=list)  # per sequence: output tokens handed out
    reported_finish: list[bool] = field(default_factory=list)  # per sequence: its finish handed out
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.reported_tokens = [0] * len(self.seqs)
        self.reported_finish = [False] * len(self.seqs)

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].is_finished if len(seqs) == 1 else all(seq.is_finished for seq in seqs)

    def take_delta(self) -> RequestDelta:
        """What the request gained since its last delta: new tokens (and logprobs) and new finishes only."""
        seqs = []
        all_finished = True
        reported, reported_finish = self.reported_tokens, self.reported_finish
        for seq in self.seqs:
            i, output = seq.seq_index, seq.output_token_ids
            start, end, finished = reported[i], len(output), seq.status is _FINISHED
            all_finished &= finished
            if start == end and (not finished or reported_finish[i]):
                continue
            logprobs = seq.output_logprobs[start:] if seq.params.logprobs is not None else None
            reason = seq.finish_reason.value if finished and seq.finish_reason else None
            seqs.append(SequenceDelta(i, output[start:], logprobs, reason, seq.stop_reason))
            reported[i] = end
            reported_finish[i] = finished
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            if self.seqs[0].num_computed_tokens >= len(self.prompt_token_ids) or all_finished:
                prompt_logprobs = self.seqs[0].prompt_logprobs
                self.prompt_logprobs_sent = True
        # (positional: error, then prompt_logprobs and num_cached_tokens)
        return RequestDelta(
            self.request_id, seqs, all_finished, None, prompt_logprobs, self.seqs[0].num_cached_tokens
        )


_FINISHED = SequenceStatus.FINISHED


def build_request(limits: RequestLimits, request: EngineRequest) -> Request:
    """The engine's sequences for a request; a prompt the engine cannot run raises ``ValueError``."""
    params = request.params
    token_ids = list(request.prompt_token_ids)
    limits.check_prompt(token_ids, params)
    max_total = limits.context_length if params.max_tokens is None else len(token_ids) + params.max_tokens
    eos_ids = frozenset(limits.eos_token_ids)
    seqs = [
        Sequence(request.request_id, i, token_ids, params, eos_token_ids=eos_ids, max_total_tokens=max_total)
        for i in range(params.n)
    ]
    for seq in seqs[1:]:
        seq.leader = seqs[0]
    return Request(request.request_id, token_ids, params, seqs)
