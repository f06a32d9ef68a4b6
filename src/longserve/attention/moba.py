"""MoBA attention in plain PyTorch: the packed-sequence reference and the paged ``moba`` engine backend.

Each query attends its own block causally plus the ``topk - 1`` earlier blocks its gating picks
(moba_gating.py). Both paths turn the selection into an additive key mask (0 or -inf) and run one softmax
over the union of chosen keys through ``F.scaled_dot_product_attention``, a slice of query rows at a time so
memory stays bounded by ``rows x keys``. That costs as much compute as dense attention on CPU: it is the correct,
readable version. On CUDA the backend hands prompt chunks and decodes to the Triton kernels (moba_paged.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from longserve.attention import moba_cuda
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.moba_gating import (
    gating_dtype,
    moba_attention_bias,
    moba_gate_keys,
    pick_blocks,
    select_moba_blocks,
)
from longserve.attention.moba_paged import cuda_decode, cuda_prefill, update_gate_keys
from longserve.attention.moba_params import validate_moba_params
from longserve.attention.paged_cache import LayerKVCache
from longserve.attention.paged_decode import cuda_path_available
from longserve.attention.recording import MobaRecord, RecordHook

MAX_QUERY_ROWS = 1024  # query rows per SDPA call: the mask and scores are [heads, rows, keys] ...
MASK_ELEMENTS = 1 << 26  # ... and that is kept under this many elements (256 MB of float32) where it can be


def moba_attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    query_rows: int | None = None,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """MoBA attention of one sequence's queries over its keys, computed in q's dtype (``sink``, ``window``:
    the blocks every query attends, ``moba_gating.forced_blocks``).

    q [queries, heads, d] sits at absolute ``positions`` [queries] (ascending); keys/values
    [context, kv_heads, d] hold positions ``0 .. context - 1`` and reach at least the last query.
    Returns [queries, heads, d]. ``query_rows``: rows per slice (default: from MAX_QUERY_ROWS, MASK_ELEMENTS).
    """
    gate_keys = moba_gate_keys(keys, chunk_size)  # [complete chunks, kv_heads, d]
    if query_rows is None:
        query_rows = max(16, min(MAX_QUERY_ROWS, MASK_ELEMENTS // (q.shape[1] * max(1, keys.shape[0]))))
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], query_rows):
        rows = slice(start, start + query_rows)
        row_pos = positions[rows]
        num_keys = int(row_pos[-1]) + 1  # later keys are causally masked for every row of this slice
        selected = select_moba_blocks(
            q[rows], gate_keys, row_pos, chunk_size, topk, sink, window
        )  # [rows, heads, topk - 1]
        bias = moba_attention_bias(selected, row_pos, num_keys, chunk_size, q.dtype)  # [heads, rows, keys]
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),  # [1, heads, rows, d]
            keys[:num_keys].to(q.dtype).transpose(0, 1).unsqueeze(0),  # [1, kv_heads, num_keys, d]
            values[:num_keys].to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=bias.unsqueeze(0),
            scale=scale,
            enable_gqa=True,
        )  # [1, heads, rows, d]
        out[rows] = attended[0].transpose(0, 1)
    return out


def moba_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """MoBA attention over packed sequences: q [total_tokens, heads, d], k/v [total_tokens, kv_heads, d],
    ``seq_lens`` the length of each sequence in packing order. Computed in float64 for float64 q, else
    float32; returns [total_tokens, heads, d] in q's dtype. ``scale`` defaults to d ** -0.5."""
    validate_moba_params(chunk_size, topk, sink, window)
    lens = [int(n) for n in seq_lens]
    if sum(lens) != q.shape[0] or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"seq_lens sum to {sum(lens)}, but q/k/v have {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = gating_dtype(q.dtype)
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        rows = slice(start, start + n)
        positions = torch.arange(n, device=q.device)
        out[rows] = moba_attend(
            q[rows].to(dtype), k[rows].to(dtype), v[rows].to(dtype), positions, chunk_size, topk, scale,
            sink=sink, window=window,
        ).to(q.dtype)  # fmt: skip
        start += n
    return out


class MobaAttention:
    """The ``moba`` engine backend: keys/values go to the paged cache, then every decode and prompt chunk
    runs MoBA attention over its sequence's cached context (chunked prefill and decode follow exactly the
    rule a single whole-prompt prefill applies at the same positions).

    ``record``: an optional hook (longserve.viz) handed a ``MobaRecord`` of every prompt chunk's gating.
    ``sink``, ``window``: blocks every query attends whatever its gating says (``forced_blocks``).
    """

    name = "moba"

    def __init__(
        self,
        chunk_size: int,
        topk: int,
        record: RecordHook[MobaRecord] | None = None,
        *,
        sink: bool = False,
        window: int = 0,
    ) -> None:
        validate_moba_params(chunk_size, topk, sink, window)
        self.chunk_size, self.topk = chunk_size, topk
        self.sink, self.window = sink, window
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
        update_gate_keys(cache, k, metadata, self.chunk_size)
        out = torch.empty_like(q)
        if metadata.num_decodes:
            out[: metadata.num_decodes] = self._decode(q[: metadata.num_decodes], cache, metadata, scale)
        # On CUDA the kernels read the cache through the block tables and gate over the cached mean keys; the
        # reference path (and a recording, which shows the keys) works on the gathered context.
        paged = cache.gate_keys is not None and self.record is None and cuda_path_available(q)
        for index, span in enumerate(metadata.prefills):
            rows = slice(span.query_start, span.query_start + span.query_len)
            if paged:
                out[rows] = cuda_prefill(
                    q[rows], k[rows], v[rows], cache, metadata, index, self.chunk_size, self.topk, scale,
                    self.sink, self.window,
                )  # fmt: skip
                continue
            if not span.cached_len:
                keys, values = cache.as_stored(k[rows]), cache.as_stored(v[rows])
            else:
                keys, values = cache.gather(metadata.context_slots(index), q.dtype)
            out[rows] = self._prefill_span(q[rows], keys, values, scale)
        return out

    def _prefill_span(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One sequence's prompt chunk: q [queries, heads, d] are the last positions of its context
        keys/values [context, kv_heads, d]. CUDA tensors go through the Triton block kernel."""
        if self.record is not None:
            # Every path gates in float32 by the same rule (moba_gating.py): this is the kernels' selection.
            record = MobaRecord.capture(
                q, keys, _positions(q, keys), self.chunk_size, self.topk, self.sink, self.window
            )
            self.record(record)
        if cuda_path_available(q):
            return moba_cuda.moba_prefill_sequence(
                q.contiguous(), keys.contiguous(), values.contiguous(), self.chunk_size, self.topk, scale,
                sink=self.sink, window=self.window,
            )  # fmt: skip
        return moba_attend(
            q, keys, values, _positions(q, keys), self.chunk_size, self.topk, scale,
            sink=self.sink, window=self.window,
        )  # fmt: skip

    def _decode(
        self, q: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """All decodes at once: q [batch, heads, d], each query at the last position of its context."""
        if cache.gate_keys is not None and cuda_path_available(q):
            return cuda_decode(q, cache, metadata, self.chunk_size, self.topk, scale, self.sink, self.window)
        slots = metadata.decode_slots  # [batch, max_context]; padding reads the zeroed pad block
        batch, max_context = slots.shape
        keys, values = cache.gather(slots, q.dtype)  # [batch, max_context, kv_heads, d]
        shape = keys.shape
        positions = torch.tensor(metadata.decode_context_lens, device=q.device) - 1  # [batch]
        # Gate keys of each context's complete chunks; a padded chunk only ever lies at or after the
        # query's own block, which gating never scores.
        num_chunks = max_context // self.chunk_size
        gated = keys[:, : num_chunks * self.chunk_size].to(gating_dtype(keys.dtype))
        gate_keys = gated.view(batch, num_chunks, self.chunk_size, *shape[2:]).mean(dim=2)
        grouped = q.to(gate_keys.dtype).view(batch, shape[2], -1, shape[3])  # [batch, kv_heads, group, d]
        scores = torch.einsum("bkgd,bnkd->bkgn", grouped, gate_keys).reshape(batch, q.shape[1], num_chunks)
        selected = pick_blocks(
            scores, positions, self.chunk_size, self.topk, self.sink, self.window
        )  # [batch, heads, topk - 1]
        # Row i of the [heads, batch, keys] bias is decode i's own; its padding lies after its position.
        bias = moba_attention_bias(selected, positions, max_context, self.chunk_size, keys.dtype)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(keys.dtype),  # [batch, heads, 1, d]
            keys.transpose(1, 2),  # [batch, kv_heads, max_context, d]
            values.transpose(1, 2),
            attn_mask=bias.transpose(0, 1).unsqueeze(2),  # [batch, heads, 1, max_context]
            scale=scale,
            enable_gqa=True,
        )  # [batch, heads, 1, d]
        return out.squeeze(2).to(q.dtype)


def _positions(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[queries]: the positions of a chunk's queries, the last ones of its context."""
    return torch.arange(keys.shape[0] - q.shape[0], keys.shape[0], device=q.device)
