"""Prepared weights for y = x W^T + b: the fastest kernel this device has for each batch size.

On CPU, fp32 weights are repacked once for oneDNN: its matmul is faster than the default BLAS at every batch
size we run and gives each row the same result whatever the number of rows, so greedy output does not depend
on what else is in the batch. Optionally a bfloat16 copy serves steps of one or two rows (single-stream
decode), which are bound by reading the weights: half the bytes, about twice the speed, not batch-invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_BATCH_ROWS = 2  # steps with at most this many rows use the small-batch weights when present
_PACK_HINT_ROWS = 16  # oneDNN packs for a typical batch; any row count still works


def onednn_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )


class PreparedMatmul:
    def __init__(
        self,
        weight: torch.Tensor,  # [out, in]
        bias: torch.Tensor | None = None,  # [out]
        small_batch_dtype: torch.dtype | None = None,
    ) -> None:
        self.bias = bias
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_ROWS)
            if onednn_available(weight)
            else None
        )
        self.weight = None if self.packed is not None else weight
        self.small_weight = weight.to(small_batch_dtype) if small_batch_dtype is not None else None
        self.small_bias = (
            bias.to(small_batch_dtype) if small_batch_dtype is not None and bias is not None else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        if self.small_weight is not None and x.shape[0] <= SMALL_BATCH_ROWS:
            return F.linear(x.to(self.small_weight.dtype), self.small_weight, self.small_bias).to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
