"""The integer dot-product kernel over GGUF blocks in tiles (``layers/packed_blocks``, ``csrc/ggml_packed.cpp``)
equals a float64 reference of the same quantized arithmetic, on every instruction-set path built on this machine
(AVX-512 VNNI where this CPU has it, AVX2, scalar), for every block format (Q4_0, Q4_1, Q8_0, Q4_K, Q5_0, Q6_K),
1 to 15 rows and shapes that leave a partial tile; each row's result is the same alone or in a batch, with one
thread or many; the tiles hold the file's values exactly."""

from __future__ import annotations

import itertools
from functools import partial

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from kquants import quantize_q4_k, random_q6_k

from longserve.layers.cpu_kernels import cpu_kernels
from longserve.layers.matmul import PreparedMatmul
from longserve.layers.packed_blocks import pack
from longserve.loading.gguf_blocks import Q4Blocks, read_blocks

Q = gguf.GGMLQuantizationType
SHAPES = ((1, 37, 96), (3, 8, 64), (4, 50, 160), (5, 16, 256), (6, 21, 64), (15, 5, 32))  # rows, out, in


def _blocks(out: int, inp: int, qtype, seed: int):
    rng = np.random.default_rng(seed)
    if qtype == Q.Q6_K:  # whole 256-weight super-blocks, random codes and scales
        return read_blocks(random_q6_k(out, max(1, inp // 256), seed=seed), qtype)
    weights = (rng.standard_normal((out, inp)) * rng.uniform(0.01, 1.0, (out, 1))).astype(np.float32)
    raw = quantize_q4_k(weights) if qtype == Q.Q4_K else quantize(weights, qtype)
    return read_blocks(raw, qtype)


def _shape(qtype, out: int, inp: int) -> tuple[int, int]:
    return (out, max(256, inp // 256 * 256)) if qtype in (Q.Q4_K, Q.Q6_K) else (out, inp)


def _reference(x: torch.Tensor, blocks, bits: int = 8) -> torch.Tensor:
    """float64 but for the codes: each 32-value block of a row as round(x / d_x), d_x = max|x| / 127 (or 32767
    for 16-bit activations; ties to even); a weight sub-block's integer dot product with it times d_w * d_x;
    plus q4's minimum times the rounded block's sum."""
    rows, inp = x.shape
    xb = x.float().view(rows, inp // 32, 32)
    # the codes as the kernel computes them, in float32: x * (1 / d_x), rounded (a 16-bit code is ~32767 units,
    # so float64 would round the rare near-tie the other way)
    dx = xb.abs().amax(-1) / (2 ** (bits - 1) - 1)  # [rows, groups]
    inverse = torch.where(dx > 0, 1 / torch.where(dx > 0, dx, 1), 0)
    qx = torch.round(xb * inverse[..., None]).double()
    dx = dx.double()
    out = blocks.codes.shape[0]
    if isinstance(blocks, Q4Blocks):
        packed = blocks.codes.view(out, -1, 16).long()
        codes = torch.cat([packed & 15, packed >> 4], dim=-1).double()  # [out, groups, 32]
    else:
        codes = blocks.codes.view(out, inp // 32, 32).double()
    sub = blocks.scale.shape[1] // (inp // 32)  # weight scales per 32-value block: 1, or 2 (Q6_K)
    dots = torch.einsum(
        "rgsj,ogsj->rogs", qx.view(rows, -1, sub, 32 // sub), codes.view(out, -1, sub, 32 // sub)
    )
    scale = blocks.scale.double().view(out, -1, sub)  # [out, groups, sub]
    y = (dots * scale[None] * dx[:, None, :, None]).sum((-1, -2))
    if isinstance(blocks, Q4Blocks):
        y = y + (qx.sum(-1) * dx) @ blocks.minimum.double().t()
    return y


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"], ids=["native", "avx2", "scalar"])
def test_every_path_and_format_equals_the_quantized_arithmetic(march: str) -> None:
    if march == "haswell" and not {"avx2", "fma"} <= _flags():
        pytest.skip("this CPU cannot run AVX2 code")
    kernels = cpu_kernels(march)
    for qtype, bits in itertools.product((Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_0, Q.Q6_K), (8, 16)):
        for rows, out, inp in SHAPES:
            out, inp = _shape(qtype, out, inp)
            blocks = _blocks(out, inp, qtype, seed=rows + out)
            tiles = pack(blocks)
            x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)) * 3
            run = partial(kernels.packed_linear, codes=tiles.codes, scale=tiles.scale, minimum=tiles.minimum)
            y = run(x, out_features=out, activation_bits=bits)
            expected = _reference(x, blocks, bits)
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4, msg=f"{qtype.name} {bits}")
            alone = [run(x[r : r + 1], out_features=out, activation_bits=bits) for r in range(rows)]
            assert torch.equal(torch.cat(alone), y), f"{qtype.name}: a row's result depends on the batch"


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q6_K])
def test_tiles_hold_the_files_values_and_give_rows_back(qtype) -> None:
    blocks = _blocks(*_shape(qtype, 37, 96), qtype, seed=0)
    tiles = pack(blocks)
    assert torch.equal(tiles.dequantize(), blocks.dequantize())
    rows = torch.tensor([36, 0, 17, 17])
    assert torch.equal(tiles.select_rows(rows).dequantize(), blocks.dequantize()[rows])
    bits = {Q.Q4_1: 4, Q.Q5_0: 5}.get(qtype, 8)  # bits a weight's code takes in the tiles, as in the file
    assert tiles.codes.numel() * 8 == 3 * 16 * blocks.dequantize_shape()[1] * bits  # 37 rows: 3 tiles of 16


def test_prepared_matmul_adds_the_bias_and_is_independent_of_the_threads() -> None:
    blocks = _blocks(96, 64, Q.Q4_1, seed=0)
    bias = torch.randn(96)
    matmul = PreparedMatmul(None, bias, "gguf", blocks=blocks)
    x = torch.randn(9, 64)
    torch.testing.assert_close(
        matmul(x).double(), _reference(x, blocks, 16) + bias.double(), rtol=1e-5, atol=1e-4
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(matmul(x), single)
    assert matmul.weight is None  # no float copy beside the tiles


def test_shape_errors_are_clear() -> None:
    matmul = PreparedMatmul(None, None, "gguf", blocks=_blocks(8, 64, Q.Q4_1, seed=0))
    with pytest.raises(RuntimeError, match="x has 96 columns, the weights 64"):
        matmul(torch.randn(2, 96))
