"""Feed-forward blocks: SwiGLU, down(silu(gate(x)) * up(x)) with gate and up fused in one matmul (decoders), and
the two-layer GELU MLP, out(act(in(x))) with biases (BERT-family encoders)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from longserve.layers.linear import Linear
from longserve.layers.triton_support import use_triton


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], False, dtype)
        self.down_proj = Linear(intermediate_size, [hidden_size], False, dtype)
        self.cpu_kernels = None  # the compiled CPU kernels (layers/cpu_kernels.py), once asked to use them

    def use_cpu_kernels(self, kernels) -> None:
        """silu(gate) * up of float32 CPU rows in one compiled call."""
        self.cpu_kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        gate_up = self.gate_up_proj(x)  # [tokens, 2 * inter]
        if self.cpu_kernels is not None and gate_up.dtype == torch.float32 and gate_up.device.type == "cpu":
            return self.down_proj(self.cpu_kernels.silu_mul(gate_up))
        if use_triton(gate_up) and gate_up.shape[0]:
            from longserve.layers.fused_triton import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [tokens, inter] each
        return self.down_proj(F.silu(gate) * up)


# HF ``hidden_act`` names -> the activation; "gelu_new" is the tanh approximation under another name.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class GeluMLP(nn.Module):
    """``output(act(intermediate(x)))``, both projections with bias; ``act`` by HF's ``hidden_act`` name."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, dtype: torch.dtype) -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[hidden_act]
        self.intermediate = Linear(hidden_size, [intermediate_size], True, dtype)
        self.output = Linear(intermediate_size, [hidden_size], True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [tokens, hidden]
        return self.output(self.act(self.intermediate(x)))  # via [tokens, intermediate]
