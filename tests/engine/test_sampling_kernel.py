"""The one-launch sampling kernel keeps the reference's filtered distributions, greedy rows, seeds and invalid
rows: on a GPU, and through Triton's interpreter on the CPU (fewer samples there: it runs ~20 ms a row)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sampling_kernel_checks
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_kernel_on_cuda() -> None:
    sampling_kernel_checks.check_all("cuda")


def test_sampling_kernel_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import sampling_kernel_checks; sampling_kernel_checks.check_all('cpu', rows=120)",
        HERE,
        timeout=600,
    )
