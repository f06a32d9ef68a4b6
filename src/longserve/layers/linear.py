"""Linear projections whose weights may be stored fused (q|k|v, gate|up) and loaded shard by shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longserve.layers.matmul import PreparedMatmul, runs_blocks
from longserve.loading.gguf_blocks import Blocks, cat_blocks


class Linear(nn.Module):
    """y = x W^T (+ b). ``shard_sizes`` splits the output rows into named parts loaded separately."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        out_features = sum(shard_sizes)
        self.in_features = in_features
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

        self.kernel: PreparedMatmul | None = None
        # Shards given as the file's low-bit blocks instead of float rows (their rows of weight stay unset).
        self.shard_blocks: dict[int, Blocks] = {}
        self.lora = None  # this projection's LoRA slots (lora/slots.py), when the engine serves adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        y = self.kernel(x) if self.kernel is not None else F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            return self.lora.add_delta(x, y)
        return y

    def prepare(self, quantization: str | None = None) -> None:
        """After loading: hand the weights to the fastest kernel (the plain copy is dropped when repacked).

        With ``gguf``, a projection whose every shard came as low-bit blocks of one format runs on them;
        one with a shard in another format (a float tensor, a K-quant) expands its blocks into the float
        weight, exactly, and takes the ``None`` path.
        """
        bias = self.bias.data if self.bias is not None else None
        blocks = self._fused_blocks() if runs_blocks(quantization) else None
        if blocks is not None:
            self.kernel = PreparedMatmul(None, bias, quantization, blocks=blocks)
            self.weight = None
            self.shard_blocks = {}
            return
        for index, shard in self.shard_blocks.items():
            self.weight[self._rows(index)].copy_(shard.dequantize())
        self.shard_blocks = {}
        self.kernel = PreparedMatmul(
            self.weight.data, bias, None if runs_blocks(quantization) else quantization
        )
        if self.kernel.weight is None:
            self.weight = None

    def load_shard(self, index: int, weight: torch.Tensor) -> None:
        """Copy one part's weight rows ([rows, in]) into place."""
        expected = (self.shard_sizes[index], self.weight.shape[1])
        if tuple(weight.shape) != expected:
            raise ValueError(f"shape {tuple(weight.shape)} != expected {expected}")
        self.weight[self._rows(index)].copy_(weight)

    def load_shard_blocks(self, index: int, blocks: Blocks) -> None:
        """Keep one part as the file's low-bit blocks (expanded at ``prepare`` unless the kernel takes them)."""
        rows, cols = blocks.dequantize_shape()
        expected = (self.shard_sizes[index], self.weight.shape[1])
        if (rows, cols) != expected:
            raise ValueError(f"shape {(rows, cols)} != expected {expected}")
        self.shard_blocks[index] = blocks

    def shard(self, index: int) -> ShardTarget:
        """The loader of part ``index``: float rows, or (``load_blocks``) the file's blocks."""
        return ShardTarget(self, index)

    def _fused_blocks(self) -> Blocks | None:
        if len(self.shard_blocks) != len(self.shard_sizes):
            return None
        parts = [self.shard_blocks[i] for i in range(len(self.shard_sizes))]
        if any(type(p) is not type(parts[0]) for p in parts):
            return None
        return cat_blocks(parts)

    def load_bias_shard(self, index: int, bias: torch.Tensor) -> None:
        """Copy one part's bias ([rows]) into place."""
        if tuple(bias.shape) != (self.shard_sizes[index],):
            raise ValueError(f"shape {tuple(bias.shape)} != expected {(self.shard_sizes[index],)}")
        self.bias[self._rows(index)].copy_(bias)

    def _rows(self, index: int) -> slice:
        return slice(self.shard_offsets[index], self.shard_offsets[index] + self.shard_sizes[index])


class ShardTarget:
    """Loads one part of a fused ``Linear``: called with float rows, or ``load_blocks`` with low-bit blocks."""

    def __init__(self, linear: Linear, index: int) -> None:
        self.linear, self.index = linear, index

    def __call__(self, weight: torch.Tensor) -> None:
        self.linear.load_shard(self.index, weight)

    def load_blocks(self, blocks: Blocks) -> None:
        self.linear.load_shard_blocks(self.index, blocks)
