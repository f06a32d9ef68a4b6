"""Prompt lookup (``ngram``): the sequence's last n tokens are looked up earlier in its own prompt and output,
and the tokens that followed their latest occurrence are the draft (vLLM's ``ngram``, llama.cpp's
``ngram-simple``). Each sequence keeps an index from n-gram to where it last ended, updated as tokens arrive,
so a lookup costs a few dict reads whatever the context length."""

from __future__ import annotations

from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.proposer import DraftProposer


class _NgramIndex:
    """One sequence's n-grams (lengths ``low``..``high``) -> the position right after their latest occurrence,
    over positions whose next token is known."""

    def __init__(self) -> None:
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions < indexed are in last_end

    def update(self, seq: Sequence, low: int, high: int) -> None:
        # The n-gram ending at the last token is left out: nothing follows it yet.
        end = seq.num_known_tokens - 1
        if end < self.indexed:
            return
        start = max(0, self.indexed - high)
        tokens = seq.token_slice(start, end)
        for stop in range(max(self.indexed, 1), end + 1):
            local = stop - start
            for n in range(low, min(high, stop) + 1):
                self.last_end[tuple(tokens[local - n : local])] = stop
        self.indexed = end + 1


class NgramProposer(DraftProposer):
    """Drafts by prompt lookup: the longest tail n-gram (``prompt_lookup_max`` down to ``_min``) seen before."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.low, self.high = prompt_lookup_min, prompt_lookup_max
        self._indexes: dict[Sequence, _NgramIndex] = {}

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` draft tokens after each sequence's last token."""
        return [self.draft(seq, length) for seq, length in zip(seqs, lengths, strict=True)]

    def draft(self, seq: Sequence, max_tokens: int) -> list[int]:
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = _NgramIndex()
        index.update(seq, self.low, self.high)
        total = seq.num_known_tokens
        tail = seq.token_slice(max(0, total - self.high), total)
        for n in range(min(self.high, len(tail)), self.low - 1, -1):
            end = index.last_end.get(tuple(tail[len(tail) - n :]))
            if end is not None:
                return seq.token_slice(end, min(end + max_tokens, total))
        return []

    def finish(self, seq: Sequence) -> None:
        self._indexes.pop(seq, None)
