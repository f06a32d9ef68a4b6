"""Reference attention: scaled dot-product scores, masked softmax over each query's valid keys (the oracle)."""

from __future__ import annotations

import torch

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.attention.recording import AttentionRecord, RecordHook


def masked_softmax(scores: torch.Tensor, valid_lens: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where only the first ``valid_lens[i]`` keys of query row i count.

    scores: [..., queries, keys]; valid_lens: [queries]. Masked keys get a huge negative score, so their
    weight underflows to exactly zero (the seed's formulation, with the dtype's own minimum).
    """
    keys = torch.arange(scores.shape[-1], device=scores.device)
    mask = keys[None, :] < valid_lens[:, None]  # [queries, keys]
    return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, valid_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [queries, heads, d], k [keys, kv_heads, d] -> masked-softmax weights [heads, queries, keys]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [keys, heads, d]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [heads, queries, keys]
    return masked_softmax(scores, valid_lens)


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [queries, heads, d], k/v [keys, kv_heads, d] -> [queries, heads, d], computed in q's dtype."""
    return weighted_values(attention_weights(q, k, valid_lens, scale), v)


def weighted_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights [heads, queries, keys] · v [keys, kv_heads, d] -> [queries, heads, d]."""
    v = v.repeat_interleave(weights.shape[0] // v.shape[1], dim=1)  # [keys, heads, d]
    return torch.einsum("hqk,khd->qhd", weights, v)


def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """Encoder (non-causal) attention over a flat batch: q/k/v [tokens, heads, d] hold ``seq_lens`` sequences
    back to back; every query sees every key of its own sequence and none of the others' (the padding mask of
    a padded batch). The masked softmax above with every key valid; float32 (float64 for float64 inputs)."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    start = 0
    for length in seq_lens:
        rows = slice(start, start + length)
        every_key = torch.full((length,), length, device=q.device)  # [queries]: all keys valid
        out[rows] = dot_product_attention(
            q[rows].to(compute_dtype), k[rows].to(compute_dtype), v[rows].to(compute_dtype), every_key, scale
        ).to(q.dtype)
        start += length
    return out


class ReferenceAttention:
    """Gathers each sequence's whole context from the cache and runs masked-softmax attention in float32
    (float64 when the inputs are float64), one sequence at a time. Slow and obviously right.

    ``record``: an optional hook (longserve.viz) handed an ``AttentionRecord`` of every attention call.
    """

    name = "reference"

    def __init__(self, record: RecordHook[AttentionRecord] | None = None) -> None:
        self.record = record

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        cache.write(k, v, metadata.slot_mapping)
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(q)
        for row, context_len in enumerate(metadata.decode_context_lens):
            slots = metadata.decode_slots[row, :context_len]
            out[row : row + 1] = self._attend(
                q[row : row + 1], cache, slots, context_len, scale, compute_dtype
            )
        for index, span in enumerate(metadata.prefills):
            rows = slice(span.query_start, span.query_start + span.query_len)
            if not span.cached_len:
                keys = cache.as_stored(k[rows]).to(compute_dtype)
                values = cache.as_stored(v[rows]).to(compute_dtype)
                out[rows] = self._attend_keys(q[rows].to(compute_dtype), keys, values, 0, scale).to(q.dtype)
            else:
                out[rows] = self._attend(
                    q[rows], cache, metadata.context_slots(index), span.context_len, scale, compute_dtype
                )
        return out

    def _attend(
        self,
        q: torch.Tensor,
        cache: LayerKVCache,
        slots: torch.Tensor,
        context_len: int,
        scale: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        keys, values = cache.gather(slots, dtype)  # [context_len, kv_heads, d]
        return self._attend_keys(q.to(dtype), keys, values, context_len - q.shape[0], scale).to(q.dtype)

    def _attend_keys(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float
    ) -> torch.Tensor:
        """q [queries, heads, d] at positions ``start ..`` over keys/values [context, kv_heads, d] holding
        positions 0 ..: query i sees keys [0, start + i]."""
        valid = torch.arange(start + 1, start + q.shape[0] + 1, device=q.device)  # [queries]
        weights = attention_weights(q, keys, valid, scale)  # [heads, queries, keys]
        if self.record is not None:
            self.record(AttentionRecord(q, keys, weights, start, scale))
        return weighted_values(weights, values)
