"""The CPU kernels over GGUF blocks (q4 for Q4_0/Q4_1, q8 for Q8_0) equal a float64 product with the file's
dequantized values, on both of their paths (up to 4 rows direct, more rows through expanded tiles)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from kquants import random_q6_k

from longserve.layers.matmul import PreparedMatmul
from longserve.loading.gguf_blocks import read_blocks

Q = gguf.GGMLQuantizationType


def _blocks(out: int, inp: int, qtype, seed: int):
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((out, inp)) * rng.uniform(0.01, 1.0, (out, 1))).astype(np.float32)
    return read_blocks(quantize(weights, qtype), qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 13])
@pytest.mark.parametrize(("out", "inp"), [(1, 32), (37, 96), (50, 160)])
def test_block_matmul_equals_the_dequantized_product(qtype, rows: int, out: int, inp: int) -> None:
    blocks = _blocks(out, inp, qtype, seed=rows + out)
    bias = torch.randn(out)
    matmul = PreparedMatmul(None, bias, "gguf", blocks=blocks)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
    y = matmul(x)
    expected = x.double() @ blocks.dequantize().double().t() + bias.double()
    assert y.shape == (rows, out) and y.dtype == torch.float32
    # The q4 direct path sums scale * (codes . x) + minimum * sum(x): the two terms may nearly cancel, so float32
    # rounding reaches ~1e-5 absolute on outputs of size ~10 (AVX2 builds measured up to 1.6e-5).
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 13])
def test_q6_k_blocks_equal_the_dequantized_product(rows: int) -> None:
    """Q6_K's int8 codes with a scale per 16 weights, on both paths (direct up to 4 rows, tiles beyond)."""
    blocks = read_blocks(random_q6_k(37, 2, seed=rows), Q.Q6_K)
    matmul = PreparedMatmul(None, None, "gguf", blocks=blocks)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ blocks.dequantize().double().t()
    torch.testing.assert_close(matmul(x).double(), expected, rtol=1e-5, atol=1e-4)
    q8 = PreparedMatmul(None, None, "gguf-q8", blocks=blocks)  # no integer kernel: the fp32 one, same values
    torch.testing.assert_close(q8(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_each_row_is_independent_of_the_threads() -> None:
    blocks = _blocks(96, 64, Q.Q4_1, seed=0)
    matmul = PreparedMatmul(None, None, "gguf", blocks=blocks)
    x = torch.randn(9, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(matmul(x), single)


def test_shape_errors_are_clear() -> None:
    blocks = _blocks(8, 64, Q.Q4_1, seed=0)
    matmul = PreparedMatmul(None, None, "gguf", blocks=blocks)
    with pytest.raises(RuntimeError, match="codes must be"):
        matmul(torch.randn(2, 96))


def test_fused_norm_and_silu_mul_equal_torch() -> None:
    from longserve.layers.cpu_kernels import cpu_kernels
    from longserve.layers.mlp import SwiGLUMLP
    from longserve.layers.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(7, 576), torch.randn(7, 576)
    exact_out, exact_sum = norm.add_forward(x, residual)
    exact_plain = norm(x)
    norm.use_cpu_kernels(cpu_kernels())
    out, summed = norm.add_forward(x, residual)
    assert torch.equal(summed, exact_sum)  # the add itself is exact
    torch.testing.assert_close(out, exact_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm(x), exact_plain, rtol=1e-6, atol=1e-6)

    gate_up = torch.randn(5, 2 * 300)
    gate, up = gate_up.double().chunk(2, dim=-1)
    fused = cpu_kernels().silu_mul(gate_up)
    torch.testing.assert_close(fused.double(), gate * torch.sigmoid(gate) * up, rtol=1e-6, atol=1e-6)
    assert SwiGLUMLP(8, 16, torch.float32).cpu_kernels is None  # off unless the model asks for them


def _cpu_flags() -> set[str]:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return set()
    return set(next((line for line in lines if line.startswith("flags")), "").split())


@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "scalar"])
def test_other_instruction_sets_compute_the_same(march: str) -> None:
    """Machines differ (AVX2, AVX-512): the code paths this CPU does not take by default are built and checked
    too, so an AVX2-only CI machine cannot meet untested code."""
    from longserve.layers.cpu_kernels import cpu_kernels

    if march == "haswell" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    kernels = cpu_kernels(march)
    for qtype in (Q.Q4_1, Q.Q8_0, Q.Q6_K):
        for rows in (1, 4, 9):
            if qtype == Q.Q6_K:  # int8 codes with a scale per 16 weights
                blocks, inp = read_blocks(random_q6_k(37, 1, seed=rows), Q.Q6_K), 256
            else:
                blocks, inp = _blocks(37, 96, qtype, seed=rows), 96
            x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
            if qtype != Q.Q4_1:
                y = kernels.q8_linear(x, blocks.codes, blocks.scale)
            else:
                y = kernels.q4_linear(x, blocks.codes, blocks.scale, blocks.minimum)
            expected = x.double() @ blocks.dequantize().double().t()
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64)
    out, summed = kernels.rms_norm(x, residual, weight, 1e-5)
    expected = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
