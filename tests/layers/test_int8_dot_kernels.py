"""The integer dot-product kernels (``--quantization gguf-q8``: activations quantized to int8 blocks, as
llama.cpp does) equal a float64 reference of the same quantized arithmetic, on every instruction-set path
(AVX-512 VNNI where this CPU has it, AVX2, scalar), for Q4_0, Q4_1 and Q8_0 blocks, 1 to 13 rows."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from longserve.layers.cpu_kernels import cpu_kernels
from longserve.layers.matmul import PreparedMatmul
from longserve.loading.gguf_blocks import read_blocks

Q = gguf.GGMLQuantizationType


def _blocks(out: int, inp: int, qtype, seed: int):
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((out, inp)) * rng.uniform(0.01, 1.0, (out, 1))).astype(np.float32)
    return read_blocks(quantize(weights, qtype), qtype)


def _reference(x: torch.Tensor, blocks) -> torch.Tensor:
    """float64: each 32-block of a row as round(x / d) with d = max|x| / 127 (ties to even), times the weight
    codes exactly, scaled by d * d_w; plus q4's minimum times the block's exact fp32 sum."""
    rows, inp = x.shape
    xb = x.double().view(rows, inp // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127  # [rows, groups, 1]
    qx = torch.round(torch.where(d > 0, xb / torch.where(d > 0, d, 1), 0))  # torch.round: ties to even
    dequant = blocks.dequantize().double()  # [out, in]
    if hasattr(blocks, "minimum"):
        codes = (
            dequant.view(-1, inp // 32, 32) - blocks.minimum.double().unsqueeze(-1)
        ) / blocks.scale.double().unsqueeze(-1)
        codes = torch.round(codes)
        dots = torch.einsum("rgj,ogj->rog", qx, codes)
        return (dots * d.squeeze(-1).unsqueeze(1) * blocks.scale.double()).sum(-1) + xb.sum(
            -1
        ) @ blocks.minimum.double().t()
    codes = torch.round(dequant.view(-1, inp // 32, 32) / blocks.scale.double().unsqueeze(-1))
    dots = torch.einsum("rgj,ogj->rog", qx, codes)
    return (dots * d.squeeze(-1).unsqueeze(1) * blocks.scale.double()).sum(-1)


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"], ids=["native", "avx2", "scalar"])
def test_every_path_equals_the_quantized_arithmetic(march: str) -> None:
    if march == "haswell" and not {"avx2", "fma"} <= _flags():
        pytest.skip("this CPU cannot run AVX2 code")
    kernels = cpu_kernels(march)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        for rows, out, inp in ((1, 37, 96), (3, 8, 64), (4, 50, 160), (13, 5, 32)):
            blocks = _blocks(out, inp, qtype, seed=rows + out)
            x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)) * 3
            if qtype == Q.Q8_0:
                y = kernels.q8_linear_int8(x, blocks.codes, blocks.scale)
            else:
                y = kernels.q4_linear_int8(x, blocks.codes, blocks.scale, blocks.minimum)
            torch.testing.assert_close(y.double(), _reference(x, blocks), rtol=1e-5, atol=1e-4)


def test_decode_rows_take_the_integer_path_and_larger_steps_the_exact_one() -> None:
    blocks = _blocks(40, 128, Q.Q4_1, seed=3)
    int8, exact = (
        PreparedMatmul(None, None, "gguf-q8", blocks=blocks),
        PreparedMatmul(None, None, "gguf", blocks=blocks),
    )
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(int8(x[:4]).double(), _reference(x[:4], blocks), rtol=1e-5, atol=1e-4)
    assert not torch.equal(int8(x[:4]), exact(x[:4]))  # approximate: activations are rounded
    assert torch.equal(int8(x), exact(x))  # more than 6 rows (prompts): the exact path
    assert torch.equal(int8(x[:1]), int8(x[:1].clone()))  # deterministic
