"""Repetition, presence and frequency penalties from per-sequence state on the logits' device.

Each penalized sequence holds a row of output-token counts and a row of prompt tokens there. They are filled
from the host's lists when it first samples, then counted on as each step samples, on the device. So a step
neither waits for the host (an overlapped step's last token is not there yet) nor re-reads whole outputs.
"""

from __future__ import annotations

import torch

from longserve.engine.sequence import Sequence
from longserve.engine.uploads import StepUploader, as_floats, float_bits


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab], edited in place
    in_prompt: torch.Tensor,  # [n, vocab] bool
    counts: torch.Tensor,  # [n, vocab] output-token counts
    repetition: torch.Tensor,  # [n]
    presence: torch.Tensor,  # [n]
    frequency: torch.Tensor,  # [n]
) -> torch.Tensor:
    """Apply per-row penalties to ``logits`` in place; returns ``logits``.

    Repetition (CTRL): tokens seen in prompt or output get positive logits divided, negative ones multiplied.
    Presence / frequency (OpenAI): over output tokens only, ``logit -= presence * [count > 0] + frequency * count``.
    """
    in_output = counts > 0  # [n, vocab]
    repetition = repetition.unsqueeze(1)  # [n, 1]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits.copy_(torch.where(in_output | in_prompt, penalised, logits))
    logits -= presence.unsqueeze(1) * in_output + frequency.unsqueeze(1) * counts
    return logits


def token_rows(token_ids: list[list[int]], vocab: int) -> tuple[list[int], list[int]]:
    """(row, id) pairs of every id in ``token_ids`` inside the vocabulary (an id outside it is skipped)."""
    rows, ids = [], []
    for row, tokens in enumerate(token_ids):
        for token in tokens:
            if 0 <= token < vocab:
                rows.append(row)
                ids.append(token)
    return rows, ids


class PenaltyState:
    """Device rows of prompt tokens and output counts, one per penalized sequence (``release`` frees it)."""

    def __init__(self, vocab: int, device: torch.device, uploader: StepUploader) -> None:
        self.vocab = vocab
        self.uploader = uploader
        self.in_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)  # [slots, vocab]
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)  # [slots, vocab]
        self._slot: dict[Sequence, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slot)

    def release(self, seq: Sequence) -> None:
        slot = self._slot.pop(seq, None)
        if slot is not None:
            self._free.append(slot)

    def apply(
        self,
        logits: torch.Tensor,
        rows: list[int],
        seqs: list[Sequence],
        drafted: list[list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penalise ``logits`` rows ``rows`` (of ``seqs``, row-aligned) in place; ``drafted[i]``: drafts that
        come before row i (a verification's row), counted as output. Returns the rows and their slots as device
        indices, for ``count`` once the rows' tokens are chosen."""
        slots = self._slots(seqs)
        params = [seq.params for seq in seqs]
        index, slot_index, repetition, presence, frequency = self.uploader.upload(
            [[rows], [slots], [float_bits([p.repetition_penalty for p in params])],
             [float_bits([p.presence_penalty for p in params])], [float_bits([p.frequency_penalty for p in params])]]
        )  # fmt: skip
        selected = logits.index_select(0, index)  # [m, vocab]
        counts = self.counts.index_select(0, slot_index)  # [m, vocab], a copy
        if drafted is not None and any(drafted):
            draft_rows, draft_ids = token_rows(drafted, self.vocab)
            d_rows, d_ids = self.uploader.upload([[draft_rows], [draft_ids]])
            counts.index_put_((d_rows, d_ids), torch.ones_like(d_ids, dtype=torch.int32), accumulate=True)
        apply_penalties(
            selected,
            self.in_prompt.index_select(0, slot_index),
            counts,
            as_floats(repetition, logits.dtype),
            as_floats(presence, logits.dtype),
            as_floats(frequency, logits.dtype),
        )
        logits.index_copy_(0, index, selected)
        return index, slot_index

    def count(self, slot_index: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add each row's chosen token ``tokens`` [m] (on the device) to its slot's counts."""
        ones = torch.ones_like(tokens, dtype=torch.int32)
        self.counts.index_put_((slot_index, tokens), ones, accumulate=True)

    def add(self, seqs: list[Sequence], tokens: list[list[int]]) -> None:
        """Count the tokens the host chose for each sequence (a verification's accepted run)."""
        rows, ids = token_rows(tokens, self.vocab)
        slots = [self._slot[seqs[row]] for row in rows]
        slot_index, token_index = self.uploader.upload([[slots], [ids]])
        self.count(slot_index, token_index)

    def _slots(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's slot; a new one is filled from its prompt and the outputs the host holds."""
        fresh = [seq for seq in seqs if seq not in self._slot]
        if fresh:
            self._grow(len(fresh))
            slots = [self._free.pop() for _ in fresh]
            prompt_rows, prompt_ids = token_rows([seq.prompt_token_ids for seq in fresh], self.vocab)
            output_rows, output_ids = token_rows([seq.output_token_ids for seq in fresh], self.vocab)
            new, p_rows, p_ids, o_rows, o_ids = self.uploader.upload(
                [[slots], [prompt_rows], [prompt_ids], [output_rows], [output_ids]]
            )
            self.in_prompt.index_fill_(0, new, False)
            self.counts.index_fill_(0, new, 0)
            self.in_prompt[new[p_rows], p_ids] = True
            self.counts.index_put_(
                (new[o_rows], o_ids), torch.ones_like(o_ids, dtype=torch.int32), accumulate=True
            )
            self._slot.update(zip(fresh, slots, strict=True))
        return [self._slot[seq] for seq in seqs]

    def _grow(self, needed: int) -> None:
        if len(self._free) >= needed:
            return
        old = self.counts.shape[0]
        new = max(2 * old, old + needed, 16)
        self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(new - old, self.vocab)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(new - old, self.vocab)])
        self._free.extend(range(new - 1, old - 1, -1))
