"""Self-attention module: fused QKV projection, optional q/k RMSNorm, RoPE, the backend call, output projection."""

from __future__ import annotations

import torch
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.layers.linear import Linear
from longserve.layers.norm import RMSNorm
from longserve.layers.rotary import apply_rotary


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        qk_norm_eps: float | None,  # set for models that RMSNorm q and k per head (Qwen3)
        backend: AttentionBackend,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = Linear(hidden_size, [self.q_size, self.kv_size, self.kv_size], qkv_bias, dtype)
        self.o_proj = Linear(self.q_size, [hidden_size], False, dtype)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype) if qk_norm_eps is not None else None
        self.backend = backend
        self.cpu_kernels = None  # the compiled CPU kernels (layers/cpu_kernels.py), once asked to use them

    def use_cpu_kernels(self, kernels) -> None:
        """Rotate fp32 CPU rows in place with one compiled call; hand the kernels to the backend too."""
        self.cpu_kernels = kernels
        if hasattr(self.backend, "use_cpu_kernels"):
            self.backend.use_cpu_kernels(kernels)

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [tokens, 1, head_dim / 2]
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [tokens, q_size + 2 * kv_size]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k sit side by side in qkv: rotate both heads-stacks in one pass.
            qk = qkv[:, : self.q_size + self.kv_size].view(
                tokens, self.num_heads + self.num_kv_heads, self.head_dim
            )
            qk = self._rotate(qk, *rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(tokens, self.num_kv_heads, self.head_dim))
            q, k = self._rotate(q, *rope), self._rotate(k, *rope)
        out = self.backend.forward(q, k, v, cache, metadata, self.scale)  # [tokens, heads, head_dim]
        return self.o_proj(out.reshape(tokens, self.q_size))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernels is not None and x.dtype == cos.dtype == torch.float32 and x.device.type == "cpu":
            self.cpu_kernels.rotary_(x, cos, sin)  # x is this step's fresh projection output: rotate in place
            return x
        return apply_rotary(x, cos, sin)
