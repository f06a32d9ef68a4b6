"""Prepared weights for y = x W^T + b: the fastest kernel this device has, chosen once after loading.

CPU, exact mode: fp32 weights repacked for oneDNN. Its matmul beats the default BLAS at every batch size we
run, and gives each row the same result whatever the number of rows, so greedy output does not depend on what
else is in the batch.

CPU, ``int8``: steps of at most ``INT8_MAX_ROWS`` rows (decode) use weights quantized per output channel to
int8 with activations quantized on the fly (fbgemm's dynamic linear): a quarter of the bytes, about 3x faster
decode than fp32 here. fbgemm takes one activation scale per call, so a long prompt chunk would share one
scale across hundreds of tokens (perplexity x2-3 on the default model); larger steps therefore keep the exact
fp32 path. Approximate, and not batch-invariant.

CPU, ``gguf`` and ``gguf-q8``: projections stored in the file as Q4_0, Q4_1, Q8_0 or the formats read as them
(Q4_K, Q5_0, Q6_K; ``loading/gguf_blocks``) stay low-bit, rearranged once into tiles of 16 columns
(``packed_blocks``), and run through our integer dot-product kernel (``csrc/ggml_packed.cpp``) with the
activations quantized per 32 values: a fifth of fp32's bytes per token. ``gguf`` rounds activations to 16 bits
(a relative error of 1.5e-5 of the block's largest value: greedy text stays the exact path's); ``gguf-q8`` to
8 bits, llama.cpp's arithmetic, 1.6x fewer instructions again at the cost of +0.4% perplexity on the default
model. Either way every row's result is the same whatever else is in the step, with any number of threads.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from longserve.layers.packed_blocks import PackedBlocks, pack
from longserve.loading.gguf_blocks import Blocks

QUANTIZATIONS = (None, "int8", "gguf", "gguf-q8")
ACTIVATION_BITS = {"gguf": 16, "gguf-q8": 8}  # what the block modes round activations to


def runs_blocks(quantization: str | None) -> bool:
    """The mode keeps the file's low-bit blocks: "gguf" (16-bit activation blocks) or "gguf-q8" (8-bit)."""
    return quantization in ACTIVATION_BITS


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
        blocks: Blocks | None = None,  # the file's blocks (gguf, gguf-q8), packed into tiles; weight unused
    ) -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.bias = bias
        self.weight: torch.Tensor | None = None
        self.packed = self.packed_int8 = None
        self.blocks: PackedBlocks | None = None
        self.activation_bits = ACTIVATION_BITS.get(quantization, 16)
        if blocks is not None:
            self.blocks = pack(blocks)
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
        b = self.blocks
        y = self._kernels.packed_linear(
            x.float().contiguous(), b.codes, b.scale, b.minimum, b.out_features, self.activation_bits
        )
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)
