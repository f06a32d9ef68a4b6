"""Speculator: before each step, the drafts of the sequences worth speculating on; after it, what held.

How many tokens a sequence drafts adapts to what it had accepted (as HF assisted generation does: two more
after a run that held entirely, one fewer otherwise), and a sequence whose drafts keep failing pauses for a
growing number of steps, so text that never repeats is not slowed down by verifying hopeless drafts. While
every sequence of a step is paused, the engine may overlap that step with the next (``drafts_next``): with
nothing to verify, speculation then costs what plain decoding costs. Where steps overlap, a sequence the
proposer finds nothing for pauses too (briefly, growing to ``_MAX_MISS_PAUSE``), since looking every step
would keep every step from overlapping; where they do not, looking costs nothing and it looks every step.
Where steps overlap, every pause also ends on a step that is a multiple of its length (a power of two): the
sequences of a batch then look again on the same steps and the steps between overlap, where pauses of their
own would leave few steps of a large batch with every sequence paused (0.78x of plain at batch 64 on an H100,
nothing accepted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longserve.config import EngineConfig, SpeculativeConfig
from longserve.engine.kv_cache import BlockManager
from longserve.engine.protocol import SpecDecodeStats, TokenLogprob
from longserve.engine.scheduler import ScheduledSequence
from longserve.engine.sequence import Sequence, SequenceStatus
from longserve.engine.spec_decode.ngram import NgramProposer
from longserve.engine.spec_decode.proposer import DraftProposer
from longserve.engine.spec_decode.suffix import SuffixProposer

_MAX_PAUSE = 32  # steps a sequence whose drafts failed repeatedly waits before drafting again
_MAX_MISS_PAUSE = 8  # steps a sequence the proposer keeps finding nothing for waits before looking again


@dataclass
class _DraftState:
    length: int  # the most tokens it drafts next
    failures: int = 0  # verifications in a row that accepted nothing
    pause: int = 0  # steps left before it drafts again
    misses: int = 0  # proposals in a row that found nothing


@dataclass
class Speculator:
    """Owns the proposer and each drafting sequence's state; the engine calls ``propose``, ``emit`` and
    ``finish``."""

    config: SpeculativeConfig
    proposer: DraftProposer
    stats: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    pause_on_miss: bool = False  # set by the engine when its steps overlap
    _states: dict[Sequence, _DraftState] = field(default_factory=dict)
    _step: int = 0  # steps proposed for so far: the clock that aligned pauses end on

    def __post_init__(self) -> None:
        self.stats.accepted_per_position = [0] * self.config.num_speculative_tokens

    def propose(self, running: list[Sequence]) -> None:
        """Set ``draft_token_ids`` of every running sequence (empty where it drafts nothing this step)."""
        self._step += 1
        drafting, lengths = [], []
        for seq in running:
            seq.draft_token_ids = []
            state = self._states.get(seq)
            if state is not None and state.pause:  # a step passes whether or not its token is on the host yet
                state.pause -= 1
                continue
            length = self._length(seq) if _can_draft(seq) else 0
            if length > 0:
                drafting.append(seq)
                lengths.append(length)
        if not drafting:
            return
        for seq, drafts in zip(drafting, self.proposer.propose(drafting, lengths), strict=True):
            if drafts and seq.grammar is not None:  # only what the grammar would let through
                drafts = drafts[: seq.grammar.validate_tokens(drafts)]
            seq.draft_token_ids = drafts
            state = self._states[seq]
            state.misses = 0 if drafts else state.misses + 1
            if not drafts and self.pause_on_miss:
                state.pause = self._pause(min(1 << (state.misses - 1), _MAX_MISS_PAUSE))

    def drafts_next(self, seqs: list[Sequence]) -> bool:
        """Whether any of ``seqs`` may draft at the next step: then the step now launched must be read back
        before that one is scheduled (a draft follows the last token, which must be on the host)."""
        for seq in seqs:
            state = self._states.get(seq)
            if state is None or not state.pause:
                return True
        return False

    def observe(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """A target step ran (before its sequences count the step's tokens): its rows' hidden states."""
        self.proposer.observe(scheduled, hidden)

    def _length(self, seq: Sequence) -> int:
        """How many tokens ``seq`` drafts this step (0: none)."""
        state = self._states.get(seq)
        if state is None:
            state = self._states[seq] = _DraftState(self.config.num_speculative_tokens)
        # The last draft must leave room for the token sampled after it.
        return min(state.length, seq.max_total_tokens - seq.num_tokens - 1)

    def emit(
        self,
        seq: Sequence,
        accepted: list[tuple[int, TokenLogprob | None]],
        num_drafts: int,
        token: int,
        logprob: TokenLogprob | None,
        append: Callable[[int, TokenLogprob | None], None],
        blocks: BlockManager,
    ) -> None:
        """Hand a verification's tokens to ``append``: the accepted drafts, then the sampled token, up to the
        first that ends the sequence. The rejected drafts' positions leave the computed count, and the blocks
        that held only them go back."""
        for draft, draft_logprob in accepted:
            append(draft, draft_logprob)
            if seq.is_finished:
                break
        else:
            append(token, logprob)
        self.record(seq, num_drafts, len(accepted))
        if not seq.is_finished:
            seq.num_computed_tokens -= num_drafts - len(accepted)
            blocks.trim(seq, seq.num_tokens)

    def record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """A verification of ``num_drafts`` drafts kept the first ``num_accepted``."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        state = self._states.get(seq)
        if state is None:
            return
        if num_accepted == num_drafts:
            state.length = min(state.length + 2, self.config.num_speculative_tokens)
        else:
            state.length = max(state.length - 1, 1)
        if num_accepted:
            state.failures = 0
        else:
            state.failures += 1
            if state.failures >= 2:
                state.pause = self._pause(min(2 ** (state.failures - 2), _MAX_PAUSE))

    def _pause(self, steps: int) -> int:
        """The steps to skip for a pause of ``steps``: where steps overlap, ``steps`` and then up to the next
        step that is a multiple of ``steps`` (a power of two), so that the pauses of a batch's sequences end
        together."""
        if not self.pause_on_miss:
            return steps
        return 2 * steps - 1 - self._step % steps

    def finish(self, seq: Sequence) -> None:
        """A sequence ended: its state goes (the suffix proposer keeps its output for later requests)."""
        self._states.pop(seq, None)
        self.proposer.finish(seq)


def _can_draft(seq: Sequence) -> bool:
    """A decoding sequence whose last token the host holds (its next step can take drafts after it)."""
    return (
        seq.status is SequenceStatus.RUNNING
        and not seq.num_pending_tokens
        and seq.num_computed_tokens == seq.num_tokens - 1
    )


def build_speculator(engine: EngineConfig, loaded, max_model_len: int) -> Speculator:
    """The speculator of ``engine.speculative_config`` for the loaded target (a draft model, or the target's
    MTP layer, is loaded onto the engine's device)."""
    c = engine.speculative_config
    if c.method == "ngram":
        proposer: DraftProposer = NgramProposer(c.prompt_lookup_min, c.prompt_lookup_max)
    elif c.method == "suffix":
        proposer = SuffixProposer(
            c.suffix_decoding_max_tree_depth,
            c.suffix_decoding_max_cached_requests,
            c.suffix_decoding_min_token_prob,
        )
    elif c.method == "mtp":
        from longserve.engine.spec_decode.mtp import MTPProposer  # loads torch models

        proposer = MTPProposer(engine, loaded, c.draft_kv_cache_memory_mb, max_model_len)
    else:
        from longserve.engine.spec_decode.draft_model import DraftModelProposer

        vocab_size = loaded.model_config.vocab_size
        proposer = DraftModelProposer(engine, c.model, c.draft_kv_cache_memory_mb, vocab_size, max_model_len)
    return Speculator(c, proposer)
