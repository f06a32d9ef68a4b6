"""Linear projections whose weights may be stored fused (q|k|v, gate|up) and loaded shard by shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longserve.layers.matmul import PreparedMatmul


class Linear(nn.Module):
    """y = x W^T (+ b). ``shard_sizes`` splits the output rows into named parts loaded separately."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        out_features = sum(shard_sizes)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

        self.kernel: PreparedMatmul | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        if self.kernel is not None:
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)

    def prepare(self, quantization: str | None = None) -> None:
        """After loading: hand the weights to the fastest kernel (the plain copy is dropped when repacked)."""
        bias = self.bias.data if self.bias is not None else None
        self.kernel = PreparedMatmul(self.weight.data, bias, quantization)
        if self.kernel.weight is None:
            self.weight = None

    def load_shard(self, index: int, weight: torch.Tensor) -> None:
        """Copy one part's weight rows ([rows, in]) into place."""
        expected = (self.shard_sizes[index], self.weight.shape[1])
        if tuple(weight.shape) != expected:
            raise ValueError(f"shape {tuple(weight.shape)} != expected {expected}")
        self.weight[self._rows(index)].copy_(weight)

    def load_bias_shard(self, index: int, bias: torch.Tensor) -> None:
        """Copy one part's bias ([rows]) into place."""
        if tuple(bias.shape) != (self.shard_sizes[index],):
            raise ValueError(f"shape {tuple(bias.shape)} != expected {(self.shard_sizes[index],)}")
        self.bias[self._rows(index)].copy_(bias)

    def _rows(self, index: int) -> slice:
        return slice(self.shard_offsets[index], self.shard_offsets[index] + self.shard_sizes[index])
