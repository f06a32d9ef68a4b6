"""RMSNorm as Llama-family models define it (normalise in float32, then scale), alone or after the residual add;
LayerNorm (mean and variance, weight and bias) as BERT-family encoders use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longserve.layers.triton_support import use_triton


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.cpu_kernels = None  # the compiled CPU kernels (layers/cpu_kernels.py), once asked to use them

    def use_cpu_kernels(self, kernels) -> None:
        """Run float32 CPU rows through one compiled call (``cpu_kernels``) instead of several torch ops."""
        self.cpu_kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if self._on_cpu_kernels(x):
            return self.cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]), None, self.weight, self.eps)[0].view(
                x.shape
            )
        if use_triton(x):
            from longserve.layers.fused_triton import rms_norm

            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].view(x.shape)
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for ``[tokens, dim]`` inputs: the pre-norm block's residual step,
        one kernel on CUDA."""
        if self._on_cpu_kernels(x) and residual.dtype == torch.float32:
            return tuple(self.cpu_kernels.rms_norm(x, residual, self.weight, self.eps))
        if use_triton(x) and x.stride(-1) == 1 and residual.stride(-1) == 1:
            from longserve.layers.fused_triton import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        summed = residual + x
        return self._norm(summed), summed

    def _on_cpu_kernels(self, x: torch.Tensor) -> bool:
        return self.cpu_kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu"

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precisions normalise in float32 like HF does, then cast back before scaling.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return normed * self.weight


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis, computed in float32 for lower
    precisions (as HF's fp16 BERT does in effect through its float32 LayerNorm parameters)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)
