"""Suffix drafts (``suffix``, after SuffixDecoding, Oliaro et al. 2024): the longest suffix of the sequence
that occurred before, in its own prompt and output or in the outputs of recent requests, and from there the
most frequent continuation, token by token, while its estimated probability holds.

Instead of materialising suffix trees (depth x length nodes), each history keeps the positions where each
bigram ended; a query extends the tail's bigram matches backwards to the longest pattern, and the majority
vote over that pattern's occurrences picks each next token: the walk a suffix tree with counts would take."""

from __future__ import annotations

from collections import Counter, deque

from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.proposer import DraftProposer

# Occurrences of the tail bigram examined per query, most recent first: bounds a query's cost on text where
# one bigram recurs thousands of times.
_MAX_CANDIDATES = 64
_SEPARATOR = -1  # between documents of the shared history: no pattern or continuation crosses it


class _History:
    """A token history and where each of its bigrams ended (the position after it), oldest first."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, int], list[int]] = {}
        self.indexed = 2  # bigrams ending before this position are in ``ends``

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def index(self, upto: int) -> None:
        """Index the bigrams ending at positions below ``upto`` (the caller leaves out the live tail)."""
        tokens, ends = self.tokens, self.ends
        for stop in range(self.indexed, upto):
            gram = (tokens[stop - 2], tokens[stop - 1])
            if _SEPARATOR not in gram:
                ends.setdefault(gram, []).append(stop)
        self.indexed = max(self.indexed, upto)

    def draft(
        self, tail: list[int], max_tokens: int, max_pattern: int, min_prob: float, oldest: int = 0
    ) -> tuple[list[int], float]:
        """The draft after the longest earlier match of ``tail`` (positions from ``oldest`` on), and its
        expected number of accepted tokens (the sum of the running probability estimates)."""
        candidates = self.ends.get((tail[-2], tail[-1]))
        if not candidates:
            return [], 0.0
        tokens, size = self.tokens, len(self.tokens)
        limit = min(max_pattern, len(tail))
        best, matched = 0, []
        for stop in reversed(candidates[-_MAX_CANDIDATES:]):
            if stop < oldest:
                break
            length = 2
            while (
                length < limit and stop - 1 - length >= 0 and tokens[stop - 1 - length] == tail[-1 - length]
            ):
                length += 1
            if length > best:
                best, matched = length, [stop]
            elif length == best:
                matched.append(stop)
        draft: list[int] = []
        prob, score = 1.0, 0.0
        for offset in range(max_tokens):
            votes = Counter(
                tokens[stop + offset] for stop in matched if stop + offset < size
            )  # a continuation running into the separator or the live tail stops there
            votes.pop(_SEPARATOR, None)
            if not votes:
                break
            token, count = votes.most_common(1)[0]
            prob *= count / len(matched)
            if prob < min_prob:
                break
            draft.append(token)
            score += prob
            matched = [stop for stop in matched if stop + offset < size and tokens[stop + offset] == token]
        return draft, score


class SuffixProposer(DraftProposer):
    """Drafts from each sequence's own history and from the outputs of the last finished requests."""

    def __init__(self, max_depth: int, max_cached_requests: int, min_token_prob: float) -> None:
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self.min_token_prob = min_token_prob
        self._own: dict[Sequence, _History] = {}
        self._shared = _History()
        self._documents: deque[tuple[int, int]] = deque()  # (start, end) of each cached output in _shared
        self._oldest = 0  # positions of _shared before this belong to evicted outputs

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` draft tokens after each sequence's last token."""
        return [self.draft(seq, length) for seq, length in zip(seqs, lengths, strict=True)]

    def draft(self, seq: Sequence, max_tokens: int) -> list[int]:
        own = self._own.get(seq)
        if own is None:
            own = self._own[seq] = _History()
        total = seq.num_known_tokens
        own.extend(seq.token_slice(len(own.tokens), total))
        own.index(total)  # up to the bigram before the last one: the last has no continuation yet
        if total < 2:
            return []
        max_pattern = max(2, self.max_depth - max_tokens)
        tail = seq.token_slice(max(0, total - max_pattern), total)
        draft, score = own.draft(tail, max_tokens, max_pattern, self.min_token_prob)
        if self._documents:
            shared, shared_score = self._shared.draft(
                tail, max_tokens, max_pattern, self.min_token_prob, self._oldest
            )
            if shared_score > score:
                draft = shared
        return draft

    def finish(self, seq: Sequence) -> None:
        """Forget the sequence's own history; keep its output for the requests that follow."""
        self._own.pop(seq, None)
        if not self.max_cached_requests or not seq.output_token_ids:
            return
        shared = self._shared
        start = len(shared.tokens)
        shared.extend([*seq.output_token_ids, _SEPARATOR])
        shared.index(len(shared.tokens))
        self._documents.append((start, len(shared.tokens)))
        while len(self._documents) > self.max_cached_requests:
            self._oldest = self._documents.popleft()[1]
        if self._oldest > len(shared.tokens) // 2:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the shared history from the outputs still cached (amortised: when half is evicted)."""
        old, documents = self._shared.tokens, list(self._documents)
        self._shared, self._documents, self._oldest = _History(), deque(), 0
        for start, end in documents:
            self._documents.append((len(self._shared.tokens), len(self._shared.tokens) + end - start))
            self._shared.extend(old[start:end])
        self._shared.index(len(self._shared.tokens))
