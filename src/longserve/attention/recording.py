"""Recording hooks of the attention backends: what a backend hands its optional ``record`` callable.

A backend built with ``record=None`` (the default) records nothing and pays one ``is None`` check per prefill
span. Given a callable (``records.append`` of a list the caller owns), it passes one record per attention call,
computed by the same functions the backend attends with. The consumers (``longserve.viz``) sit above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from longserve.attention.moba_gating import gate_scores, moba_gate_keys, select_moba_blocks

R = TypeVar("R")
RecordHook = Callable[[R], None]  # the hook a backend calls with each record; None: recording is off


@dataclass(frozen=True)
class AttentionRecord:
    """One sequence's attention in one call of the reference backend, in its compute dtype (float32/64)."""

    q: torch.Tensor  # [queries, heads, d]
    k: torch.Tensor  # [keys, kv_heads, d]: the whole context, positions 0..keys-1
    weights: torch.Tensor  # [heads, queries, keys]: the masked-softmax weights the backend attends with
    query_start: int  # the position of the first query (queries are the last positions of the context)
    scale: float  # what multiplied q·k before the softmax


@dataclass(frozen=True)
class MobaRecord:
    """One sequence's MoBA gating in one prefill call: the gate scores and the blocks picked from them."""

    q: torch.Tensor  # [queries, heads, d], in the gating dtype
    k: torch.Tensor  # [keys, kv_heads, d]: the whole context, positions 0..keys-1
    positions: torch.Tensor  # [queries]: absolute position of each query
    gate_keys: torch.Tensor  # [complete blocks, kv_heads, d]: mean key of each complete block
    scores: torch.Tensor  # [queries, heads, complete blocks]: q · gate key, before masking later blocks
    selected: torch.Tensor  # long [queries, heads, topk - 1]: chosen earlier blocks, best first, -1 = none
    chunk_size: int
    topk: int

    @classmethod
    def capture(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        chunk_size: int,
        topk: int,
        sink: bool = False,
        window: int = 0,
    ) -> MobaRecord:
        """The gating of queries ``q`` at ``positions`` over keys ``k``, through moba_gating's functions."""
        gate_keys = moba_gate_keys(k, chunk_size)
        return cls(
            q=q.to(gate_keys.dtype),
            k=k,
            positions=positions,
            gate_keys=gate_keys,
            scores=gate_scores(q, gate_keys),
            selected=select_moba_blocks(q, gate_keys, positions, chunk_size, topk, sink, window),
            chunk_size=chunk_size,
            topk=topk,
        )
