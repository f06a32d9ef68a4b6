"""Prepared weights for y = x W^T + b: the fastest kernel this device has, chosen once after loading.

CPU, exact mode: fp32 weights repacked for oneDNN. Its matmul beats the default BLAS at every batch size we
run, and gives each row the same result whatever the number of rows, so greedy output does not depend on what
else is in the batch.

CPU, ``int8``: steps of at most ``INT8_MAX_ROWS`` rows (decode) use weights quantized per output channel to
int8 with activations quantized on the fly (fbgemm's dynamic linear): a quarter of the bytes, about 3x faster
decode than fp32 here. fbgemm takes one activation scale per call, so a long prompt chunk would share one
scale across hundreds of tokens (perplexity x2-3 on the default model); larger steps therefore keep the exact
fp32 path. Approximate, and not batch-invariant.

CPU, ``gguf``: projections stored in the file as Q4_0, Q4_1 or Q8_0 stay in those blocks and run through our
own kernels (``cpu_kernels``): about a fifth of fp32's bytes per token, with the file's exact values, fp32
activations and fp32 accumulation. Steps of up to 4 rows take a direct path, larger steps expand 16 columns
at a time; the two sum in different orders, so results are not batch-invariant either.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from longserve.loading.gguf_blocks import Blocks, Q4Blocks

QUANTIZATIONS = (None, "int8", "gguf", "gguf-q8")
# Steps of up to this many rows take the integer dot-product kernels under "gguf-q8" (decodes, and a
# verification of 5 drafts): beyond it the exact tiled path is as fast (measured in benchmarks/NOTES.md).
INT8_DOT_MAX_ROWS = 6


def runs_blocks(quantization: str | None) -> bool:
    """The mode keeps the file's low-bit blocks: "gguf" (fp32 activations, exact) or "gguf-q8" (decode
    steps quantize the activations to int8 blocks for integer dot products, as llama.cpp does)."""
    return quantization in ("gguf", "gguf-q8")


_PACK_HINT_ROWS = 16  # oneDNN packs for a typical batch; any row count still works
INT8_MAX_ROWS = 16  # larger steps (prompt chunks) take the exact path


def _onednn_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )


def _int8_available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def quantize_int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantization, one scale per output row: [out, in] float -> quantized tensor."""
    scale = (weight.abs().amax(dim=1).double() / 127.0).clamp_min(1e-12)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # Quantized tensors are deprecated in torch but remain the only way into fbgemm's packed int8 matmul.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight.float(), scale, zero_point, 0, torch.qint8)


class PreparedMatmul:
    def __init__(
        self,
        weight: torch.Tensor,  # [out, in]
        bias: torch.Tensor | None = None,  # [out]
        quantization: str | None = None,
        repack: bool = True,  # False: larger steps use ``weight`` as given, sparing a repacked copy
        blocks: Blocks | None = None,  # the file's low-bit blocks (``quantization="gguf"``); weight unused
    ) -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.bias = bias
        self.weight: torch.Tensor | None = None
        self.packed = self.packed_int8 = None
        self.blocks = blocks
        self.int8_dot = quantization == "gguf-q8"
        if blocks is not None:
            from longserve.layers.cpu_kernels import cpu_kernels

            self._kernels = cpu_kernels()  # built (or loaded) now: a start-up error, not a first-request one
            return
        if quantization == "int8" and _int8_available(weight):
            float_bias = bias.float() if bias is not None else None
            self.packed_int8 = torch.ops.quantized.linear_prepack(
                quantize_int8_per_channel(weight), float_bias
            )
        if repack and _onednn_available(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_ROWS)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        if self.blocks is not None:
            return self._block_linear(x)
        if self.packed_int8 is not None and x.shape[0] <= INT8_MAX_ROWS:
            # reduce_range: 7-bit activations keep AVX2's 16-bit pairwise sums from saturating.
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed_int8, True).to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _block_linear(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float().contiguous()
        b = self.blocks
        # (Q6_K's 16-weight scales have no integer kernel: those blocks run with fp32 activations)
        int8_dot = (
            self.int8_dot and x32.shape[0] <= INT8_DOT_MAX_ROWS and (isinstance(b, Q4Blocks) or b.group == 32)
        )
        if isinstance(b, Q4Blocks):
            linear = self._kernels.q4_linear_int8 if int8_dot else self._kernels.q4_linear
            y = linear(x32, b.codes, b.scale, b.minimum)
        else:
            linear = self._kernels.q8_linear_int8 if int8_dot else self._kernels.q8_linear
            y = linear(x32, b.codes, b.scale)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)
