"""Dense attention: prompt chunks through the paged prefill kernel on CUDA (else torch SDPA per chunk), decodes
through the paged split-K kernel on CUDA or the CPU's compiled kernel (else SDPA over gathered slots)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.attention.paged_decode import cuda_dense_decode, cuda_path_available
from longserve.attention.paged_prefill import paged_prefill

# What the compiled CPU decode attention reads: fp32 rows, or fp16 rows it widens as it reads them.
CPU_KERNEL_CACHE_DTYPES = (torch.float32, torch.float16)


class DenseAttention:
    """Full causal attention through ``F.scaled_dot_product_attention`` (GQA without repeating K/V)."""

    name = "dense"

    def __init__(self) -> None:
        self.cpu_kernels = (
            None  # the compiled CPU kernels (layers/cpu_kernels.py), once the model asks for them
        )

    def use_cpu_kernels(self, kernels) -> None:
        """Decode fp32 CPU rows with the compiled paged kernel instead of a gather and SDPA."""
        self.cpu_kernels = kernels

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
        if not metadata.prefills:
            return self._decode(q, cache, metadata, scale)
        out = torch.empty_like(q)
        decodes = metadata.num_decodes
        if decodes:
            out[:decodes] = self._decode(q[:decodes], cache, metadata, scale)
        paged = metadata.paged_prefills
        if paged is not None and _paged_prefill_pays(metadata) and cuda_path_available(q, any_head_dim=True):
            out[decodes:] = paged_prefill(
                q[decodes:], cache.key, cache.value, paged.block_tables, paged.query_starts, paged.context_lens,
                paged.max_query_len, metadata.block_size, scale,
            )  # fmt: skip
            return out
        for index, span in enumerate(metadata.prefills):
            rows = slice(span.query_start, span.query_start + span.query_len)
            if not span.cached_len:
                out[rows] = _sdpa(
                    q[rows], cache.as_stored(k[rows]), cache.as_stored(v[rows]), scale, causal=True
                )
            else:
                keys, values = cache.gather(metadata.context_slots(index), q.dtype)
                mask = _offset_causal_mask(span.query_len, span.context_len, q.device)
                out[rows] = _sdpa(q[rows], keys, values, scale, mask=mask)
        return out

    def _decode(
        self, q: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if cuda_path_available(q, any_head_dim=True):  # split-K Triton kernel over the paged cache: no gather
            return cuda_dense_decode(q, cache, metadata, scale)
        if self.cpu_kernels is not None and _cpu_kernel_takes(q, cache):
            return self.cpu_kernels.paged_decode(
                q,
                cache.key,
                cache.value,
                metadata.decode_block_tables,
                metadata.decode_seq_lens,
                metadata.block_size,
                scale,
            )  # [batch, heads, d], read through the block tables: no gathered copy either
        keys, values = cache.gather(metadata.decode_slots, q.dtype)  # [batch, max_context, kv_heads, d]
        mask = metadata.decode_mask  # None when every context has the same length
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # [batch, heads, 1, d]
        return out.squeeze(2)


def _cpu_kernel_takes(q: torch.Tensor, cache: LayerKVCache) -> bool:
    """fp32 CPU queries over a CPU cache the compiled kernel reads."""
    return q.dtype == torch.float32 and cache.key.dtype in CPU_KERNEL_CACHE_DTYPES and not q.is_cuda


def _paged_prefill_pays(metadata: AttentionMetadata) -> bool:
    """Several chunks (one launch instead of one per chunk) or a cached prefix (no gathered copy, no mask
    tensor). A single fresh prompt stays with cuDNN's SDPA until the kernel is measured against it."""
    return len(metadata.prefills) > 1 or any(span.cached_len for span in metadata.prefills)


def _offset_causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, context_len] bool mask: the queries are the last positions of the context."""
    start = context_len - query_len
    keys = torch.arange(context_len, device=device)
    return keys[None, :] <= torch.arange(start, context_len, device=device)[:, None]


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sequence: q [queries, heads, d], k/v [keys, kv_heads, d] -> [queries, heads, d]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.to(q.dtype).transpose(0, 1).unsqueeze(0),
        v.to(q.dtype).transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )  # [1, heads, queries, d]
    return out[0].transpose(0, 1)
