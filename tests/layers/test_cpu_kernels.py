"""The small per-layer CPU kernels (RMSNorm with the residual add, SiLU·mul) equal torch, on every instruction
set this machine can run (the block matmuls: test_packed_kernels.py)."""

from __future__ import annotations

import pytest
import torch


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
    too, so an AVX2-only CI machine cannot meet untested code (the matmuls: test_packed_kernels.py)."""
    from longserve.layers.cpu_kernels import cpu_kernels

    if march == "haswell" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    kernels = cpu_kernels(march)
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64)
    out, summed = kernels.rms_norm(x, residual, weight, 1e-5)
    expected = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
