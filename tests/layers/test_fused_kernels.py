"""The fused Triton kernels (RMSNorm + residual, rotary, SiLU·mul, K/V store) equal float64 references: on a
GPU, and through Triton's interpreter on the CPU (so CI checks the kernels' indexing without a GPU)."""

from __future__ import annotations

from pathlib import Path

import fused_checks
import pytest
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_on_cuda() -> None:
    fused_checks.check_all("cuda")


def test_fused_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import fused_checks; fused_checks.check_all('cpu')",
        HERE,
    )
