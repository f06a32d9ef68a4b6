"""DraftProposer: what the speculator asks of a draft source (n-gram, suffix, draft model, MTP)."""

from __future__ import annotations

from typing import Protocol

import torch

from longserve.engine.scheduler import ScheduledSequence
from longserve.engine.sequence import Sequence


class DraftProposer(Protocol):
    """Proposers subclass it for its defaults: no hidden states wanted, nothing to do when a step ran."""

    # True: ``observe`` gets every target step's final hidden states (the runner keeps them for it)
    needs_hidden_states: bool = False

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` draft tokens after each sequence's last token."""
        ...

    def finish(self, seq: Sequence) -> None:
        """The sequence ended: forget what is kept for it."""
        ...

    def observe(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """A target step ran (its sequences not yet advanced): its rows' final hidden states [tokens, hidden],
        each scheduled sequence's rows in turn. Only called when ``needs_hidden_states``."""
