"""Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and kv projections, decoupled RoPE, attention.

Cache layout. MLA compresses each token's keys and values into one latent (``kv_lora_rank`` values, plus a
``qk_rope_head_dim`` RoPE key shared by all heads). Here the latent is *expanded* before caching: every head's
key ``[k_nope | k_pe]`` (``qk_head_dim`` values) and value (``v_head_dim``) go into the ordinary paged cache,
with ``kv_heads = num_heads``, so the existing attention backends run MLA unchanged. The cache has one head
size for keys and values, so the shorter of the two is zero-padded to ``cache_head_dim``: a zero value column
adds nothing to the output (it is sliced off), and a zero column in both q and k adds nothing to the scores.
That costs memory (DeepSeek-V3: 2 x 192 values per head and token instead of 512 + 64 per token); caching the
latent itself and absorbing ``kv_b_proj`` into q and o ("weight absorption") is the later optimisation.

RoPE layout. DeepSeek checkpoints rotate the RoPE dimensions as interleaved pairs ``(x0, x1), (x2, x3), ...``
(HF's V2 via complex numbers, V3 via ``rope_interleave``). A dot product does not care how q and k order
their dimensions as long as both use the same order, so at load time we permute the RoPE rows of the
projections into the "rotate half" order ``(x0, x2, ..., x1, x3, ...)`` and use the shared ``apply_rotary``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.distributed.parallel import TensorParallel
from longserve.layers.linear import Linear
from longserve.layers.norm import RMSNorm
from longserve.layers.rotary import apply_rotary, rope_inverse_frequencies
from longserve.layers.weight_loading import Loader, copier

# HF builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLAConfig:
    """Shapes of one MLA layer (HF names), checked on construction."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None  # None: q comes straight from hidden (q_proj), as in DeepSeek-V2-Lite
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj
    rope_interleave: bool  # checkpoint RoPE dims are interleaved pairs (permuted into rotate-half at load)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            raise ValueError(f"config.json: qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(
                f"config.json: q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config.json: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_head_dim(self) -> int:
        """Head size of the cached keys and values: both padded to the larger of the two."""
        return max(self.qk_head_dim, self.v_head_dim)


def _rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched ``factor`` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context fix)."""
    scale = qk_head_dim**-0.5
    if _rope_type(rope_scaling) != "default" and rope_scaling.get("mscale_all_dim"):
        mscale = yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
        scale *= mscale * mscale
    return scale


def _yarn_frequencies(
    dim: int, theta: float, scaling: dict, max_positions: int
) -> tuple[torch.Tensor, float]:
    """[dim // 2] inverse frequencies and the cos/sin multiplier, as HF's ``_compute_yarn_parameters``."""
    factor = scaling.get("factor")
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # float32 like HF, so the tables agree to the last bit.
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (short wavelengths), 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class MLARotary(nn.Module):
    """cos/sin tables of the decoupled RoPE dims (default, linear, llama3 or YaRN scaling), for all layers."""

    def __init__(self, rope_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        if _rope_type(scaling) == "yarn":
            inv_freq, attention_factor = _yarn_frequencies(rope_dim, theta, scaling, max_positions)
        else:
            # Raises for any other scaling type, naming the supported ones.
            inv_freq, attention_factor = rope_inverse_frequencies(rope_dim, theta, scaling), 1.0
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [positions, d/2]
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions: each [tokens, 1, rope_dim // 2]."""
        return self.cos[positions, None, :].to(dtype), self.sin[positions, None, :].to(dtype)


def deinterleave_rope_rows(weight: torch.Tensor, rope_dim: int, rows_per_head: int) -> torch.Tensor:
    """Reorder the last ``rope_dim`` rows of every ``rows_per_head`` block from pairs to rotate-half order.

    weight: [heads * rows_per_head, ...] (a bias works too). Rows (r0, r1, r2, r3, ...) of each head's RoPE
    part become (r0, r2, ..., r1, r3, ...).
    """
    blocks = weight.reshape(-1, rows_per_head, *weight.shape[1:])  # [heads, rows_per_head, ...]
    rope = blocks[:, rows_per_head - rope_dim :]
    reordered = torch.cat([blocks[:, : rows_per_head - rope_dim], rope[:, 0::2], rope[:, 1::2]], dim=1)
    return reordered.reshape(weight.shape)


class MultiHeadLatentAttention(nn.Module):
    """hidden -> (latent q, latent kv) -> per-head q, k, v -> paged attention -> o_proj.

    ``q_proj``/``q_a_proj`` and ``kv_a_proj_with_mqa`` read the same input, so they run as one fused matmul.
    """

    def __init__(
        self,
        config: MLAConfig,
        scale: float,
        backend: AttentionBackend,
        dtype: torch.dtype,
        tp: TensorParallel | None = None,  # a rank holds its heads; the latent projections are replicated
    ) -> None:
        super().__init__()
        self.tp = tp = tp or TensorParallel()
        c = self.config = replace(config, num_heads=tp.local(config.num_heads, "num_attention_heads"))
        self.scale, self.backend = scale, backend
        q_size = c.num_heads * c.qk_head_dim
        self.q_in_size = q_size if c.q_lora_rank is None else c.q_lora_rank
        # Shards: 0 = q_proj or q_a_proj, 1 = kv_a_proj_with_mqa ([latent | k_pe]).
        self.fused_a_proj = Linear(
            c.hidden_size, [self.q_in_size, c.kv_lora_rank + c.qk_rope_head_dim], c.attention_bias, dtype
        )
        self.q_a_layernorm = self.q_b_proj = None
        if c.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(c.q_lora_rank, [q_size], False, dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(
            c.kv_lora_rank, [c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)], False, dtype
        )
        self.o_proj = Linear(c.num_heads * c.v_head_dim, [c.hidden_size], c.attention_bias, dtype)

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [tokens, 1, qk_rope_head_dim / 2]
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        c, tokens = self.config, x.shape[0]
        nope, rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        q, kv_a = self.fused_a_proj(x).split([self.q_in_size, c.kv_lora_rank + rope_dim], dim=-1)
        if self.q_b_proj is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.reshape(tokens, c.num_heads, c.qk_head_dim)
        latent, k_pe = kv_a.split([c.kv_lora_rank, rope_dim], dim=-1)  # [tokens, kv_lora], [tokens, rope]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(tokens, c.num_heads, nope + c.v_head_dim)
        k_nope, v = kv.split([nope, c.v_head_dim], dim=-1)

        q_pe = apply_rotary(q[..., nope:], *rope)  # [tokens, heads, rope]
        k_pe = apply_rotary(k_pe.view(tokens, 1, rope_dim), *rope)  # one RoPE key shared by every head
        q = torch.cat([q[..., :nope], q_pe], dim=-1)  # [tokens, heads, qk_head_dim]
        k = torch.cat([k_nope, k_pe.expand(tokens, c.num_heads, rope_dim)], dim=-1)
        pad = c.cache_head_dim - c.qk_head_dim
        if pad:  # only when v_head_dim > qk_head_dim: zero columns in q and k leave the scores unchanged
            q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        v = F.pad(v, (0, c.cache_head_dim - c.v_head_dim))  # [tokens, heads, cache_head_dim]

        out = self.backend.forward(q, k, v, cache, metadata, self.scale)  # [tokens, heads, cache_head_dim]
        return self.o_proj(out[..., : c.v_head_dim].reshape(tokens, c.num_heads * c.v_head_dim))

    def weight_loaders(self, prefix: str) -> dict[str, Loader]:
        """HF tensor name (under ``prefix``, e.g. ``model.layers.3.self_attn.``) -> loader function."""
        c = self.config

        tp = self.tp
        heads = tp.rows  # this rank's heads of a per-head projection (the whole tensor on one device)

        def whole(tensor: torch.Tensor) -> torch.Tensor:  # replicated: the latent projections
            return tensor

        def into(
            linear: Linear, shard: int, take, rows_per_head: int | None = None, bias: bool = False
        ) -> Loader:
            # rows_per_head: rows form heads ending in RoPE dims, reordered (whole, before slicing) when the
            # checkpoint pairs them.
            reordered = rows_per_head is not None and c.rope_interleave
            if not bias and not reordered and (take is whole or not tp.is_parallel):
                return linear.shard(shard)  # the checkpoint's rows as they are (LoRA can target it)

            def load(tensor: torch.Tensor) -> None:
                if reordered:
                    tensor = deinterleave_rope_rows(tensor, c.qk_rope_head_dim, rows_per_head)
                (linear.load_bias_shard if bias else linear.load_shard)(shard, take(tensor))

            return load

        kv_a_rows = c.kv_lora_rank + c.qk_rope_head_dim  # kv_a_proj_with_mqa: one "head", [latent | k_pe]
        loaders = {
            "kv_a_proj_with_mqa.weight": into(self.fused_a_proj, 1, whole, kv_a_rows),
            "kv_a_layernorm.weight": copier(self.kv_a_layernorm.weight),
            "kv_b_proj.weight": into(self.kv_b_proj, 0, heads),
            "o_proj.weight": into(self.o_proj, 0, partial(tp.rows, dim=1)),  # row-parallel: input columns
        }
        if c.q_lora_rank is None:
            loaders["q_proj.weight"] = into(self.fused_a_proj, 0, heads, c.qk_head_dim)
        else:
            loaders["q_a_proj.weight"] = into(self.fused_a_proj, 0, whole)
            loaders["q_a_layernorm.weight"] = copier(self.q_a_layernorm.weight)
            loaders["q_b_proj.weight"] = into(self.q_b_proj, 0, heads, c.qk_head_dim)
        if c.attention_bias:
            loaders["kv_a_proj_with_mqa.bias"] = into(self.fused_a_proj, 1, whole, kv_a_rows, bias=True)
            loaders["o_proj.bias"] = into(self.o_proj, 0, tp.on_first_rank, bias=True)
            if c.q_lora_rank is not None:  # HF gives q_proj no bias even with attention_bias
                loaders["q_a_proj.bias"] = into(self.fused_a_proj, 0, whole, bias=True)
        return {prefix + name: load for name, load in loaders.items()}
