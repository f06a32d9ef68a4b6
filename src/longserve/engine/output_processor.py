"""Token deltas -> text: one ``RequestText`` per request turns the engine's ``RequestDelta``s into text pieces
per completion (incremental detokenization, stop strings), off the engine's critical path.

Torch-free: the API server (the front end) runs it for every streamed request; the worker's own HTTP generate
endpoints and the offline ``LLM`` use the same one. A stop string is matched here, so the completion ends here
with finish_reason "stop" and the caller aborts that completion in the engine (``RequestText.apply`` says
which); tokens the engine generated past the match are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from longserve.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from longserve.engine.protocol import RequestDelta, TokenLogprob
from longserve.engine.sampling_params import SamplingParams


@dataclass
class TextPiece:
    """What one delta added to one completion, as text."""

    index: int  # which of the request's n completions
    text: str  # new text (never half a UTF-8 character or a possible stop string's start)
    token_ids: list[int]  # new token ids (up to the one that completed a stop string)
    logprobs: list[TokenLogprob] | None  # one per new token, when asked
    finish_reason: str | None = None  # set once, on the completion's last piece
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


class RequestText:
    """One request's completions as text; ``apply`` each delta in order."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        stream_text: bool = True,
    ) -> None:
        """``stream_text=False``: a completion's text may all come in its last piece (one decode, not one a
        token) unless stop strings need it sooner; for callers that join the pieces at the end."""
        self.params = params
        self.detokenizers = [
            IncrementalDetokenizer(
                tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                stream_text=stream_text,
            )
            for _ in range(params.n)
        ]
        self.finished = [False] * params.n  # completions whose last piece went out
        self.num_output_tokens = [0] * params.n  # tokens counted in usage (up to a stop string's)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def apply(self, delta: RequestDelta) -> tuple[list[TextPiece], list[int]]:
        """The delta's pieces, and the completions a stop string ended here (abort them in the engine)."""
        pieces, stopped = [], []
        for seq in delta.seqs:
            i = seq.index
            if self.finished[i]:
                continue  # ended here by a stop string; the engine's abort of it says nothing new
            detokenizer = self.detokenizers[i]
            texts, stop = [], None
            taken = 0
            for token in seq.token_ids:
                taken += 1
                released = detokenizer.add_token(token)
                texts.append(released.text)
                if released.stop_string is not None:
                    stop = released.stop_string
                    break
            token_ids = seq.token_ids if taken == len(seq.token_ids) else seq.token_ids[:taken]
            logprobs = seq.logprobs
            if logprobs is not None and taken < len(logprobs):
                logprobs = logprobs[:taken]
            self.num_output_tokens[i] += taken
            finish, stop_reason = seq.finish_reason, seq.stop_reason
            if stop is not None:
                finish, stop_reason = "stop", stop
                stopped.append(i)
            elif finish is not None:
                texts.append(detokenizer.flush())
            if finish is not None:
                self.finished[i] = True
            pieces.append(TextPiece(i, "".join(texts), token_ids, logprobs, finish, stop_reason))
        if delta.finished:
            for i, done in enumerate(self.finished):  # a failed request may end without a last token
                if not done:
                    self.finished[i] = True
                    text = self.detokenizers[i].flush()  # the text of tokens it did generate
                    pieces.append(
                        TextPiece(i, text, [], [] if self.params.logprobs is not None else None, "abort")
                    )
        return pieces, stopped
