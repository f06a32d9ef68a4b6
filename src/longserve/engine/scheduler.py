"""Scheduler: decides each step which sequences run and how many of their tokens, under a token budget.

One invariant drives everything (as in vLLM v1): every scheduled sequence's ``num_computed_tokens`` moves
toward its ``num_tokens``. A fresh prompt, a prompt chunk, a decode and a recompute after preemption differ
only in how far apart those two numbers are.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from longserve.engine.kv_cache import BlockManager
from longserve.engine.sequence import FinishReason, Sequence, SequenceStatus

if TYPE_CHECKING:
    from longserve.lora.manager import LoRAManager


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    num_draft_tokens: int = 0  # of those, the last ones are seq.draft_token_ids[:num_draft_tokens]
    # Logits for every row, not just the last: a draft model catching up on a few tokens, so that a step of
    # such rows is all sampling decode rows and replays a CUDA graph (the extra logits are cheap; eager is not).
    logits_every_row: bool = False

    @property
    def draft_token_ids(self) -> list[int]:
        return self.seq.draft_token_ids[: self.num_draft_tokens]

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.seq.num_computed_tokens > 0

    @property
    def completes_sequence(self) -> bool:
        """After this step every known token is cached, so the model's last logits give the next token."""
        return (
            self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens + self.num_draft_tokens
        )


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # decodes first, then verifications, then prompt chunks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        lora: LoRAManager | None = None,  # a sequence with an adapter starts once its adapter has a slot
    ) -> None:
        self.blocks = block_manager
        self.lora = lora
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: the last one is preempted first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def check_fits(self, seq: Sequence) -> None:
        """Raise ``ValueError`` if ``seq``'s prompt could never fit, even in an empty cache."""
        if self.blocks.blocks_needed(seq, seq.num_tokens) > self.blocks.num_usable_blocks:
            raise ValueError(
                f"prompt needs {seq.num_tokens} tokens of KV cache but the whole cache holds "
                f"{self.blocks.num_usable_blocks * self.blocks.block_size}"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        # The step's order: decodes, then verifications of drafts (decode rows too), then prompt chunks, each
        # group in arrival order (running first, then those joining).
        decodes: list[ScheduledSequence] = []
        verifications: list[ScheduledSequence] = []
        chunks: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        index = 0
        block_size = self.blocks.block_size
        running = self.running
        while index < len(running) and budget > 0:
            seq = running[index]
            index += 1
            total = seq.num_tokens
            if seq.num_pending_tokens and total >= seq.max_total_tokens:
                continue  # its last token is still on the device: it ends when the host reads it
            computed, drafts = seq.num_computed_tokens, len(seq.draft_token_ids)
            uncomputed = total - computed
            if uncomputed == 1 and not drafts and computed and computed < len(seq.block_table) * block_size:
                decodes.append(ScheduledSequence(seq, 1))  # the common case: a decode in the blocks it holds
                budget -= 1
                continue
            # A decode may bring drafts to verify: they run as extra query tokens, as far as the budget goes.
            count = min(uncomputed + drafts, budget)
            target = computed + count
            if count > uncomputed and not self.blocks.can_grow(seq, target):
                count = min(uncomputed, budget)  # drafts never push another sequence out
                target = computed + count
            if target > len(seq.block_table) * block_size:
                while not self.blocks.can_grow(seq, target) and running[-1] is not seq:
                    preempted.append(self._preempt(running.pop()))
                if not self.blocks.can_grow(seq, target):
                    preempted.append(self._preempt(running.pop()))  # seq itself: nothing else to take
                    break
                self.blocks.grow(seq, target)
            item = ScheduledSequence(seq, count, max(0, count - uncomputed))
            (decodes if item.is_decode else verifications if item.num_draft_tokens else chunks).append(item)
            budget -= count

        # New or preempted work joins only when nobody was pushed out this step, so nothing thrashes. It starts
        # from its longest cached prefix (a preempted sequence recomputes only what was evicted meanwhile).
        index = 0
        while (
            index < len(self.waiting)
            and budget > 0
            and not preempted
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[index]
            # (a sequence preempted with a token still on the device waits until the host has it)
            if self._waits_for_leader(seq) or seq.num_pending_tokens:
                index += 1
                continue
            hits = self.blocks.match_prefix(seq) if seq.params.prompt_logprobs is None else []
            cached = len(hits) * self.blocks.block_size
            count = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_start(seq, hits, cached + count):
                break
            if seq.lora_id and not self.lora.acquire(seq):
                index += 1  # every adapter slot is in use by running sequences of other adapters
                continue
            del self.waiting[index]
            self.blocks.start_from(seq, hits)
            self.blocks.grow(seq, cached + count)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            item = ScheduledSequence(seq, count)
            (decodes if item.is_decode else chunks).append(item)
            budget -= count
        return SchedulerOutput(decodes + verifications + chunks, preempted)

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Completions 1.. of an n > 1 request start once the first has cached the shared prompt blocks."""
        leader = seq.leader
        if leader is None or leader.is_finished or seq.params.prompt_logprobs is not None:
            return False
        if not self.blocks.enable_prefix_caching:
            return False
        shared = (leader.num_prompt_tokens - 1) // self.blocks.block_size * self.blocks.block_size
        return leader.num_computed_tokens < shared

    def _preempt(self, seq: Sequence) -> Sequence:
        """Drop the sequence's KV; it will be recomputed (prompt + output so far) when rescheduled."""
        self.blocks.free(seq)  # its full blocks stay cached until evicted
        if self.lora is not None:
            self.lora.release(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark finished and return its blocks, wherever it is (running, waiting or preempted)."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        if self.lora is not None:
            self.lora.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
