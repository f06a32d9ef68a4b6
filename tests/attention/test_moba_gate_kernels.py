"""MoBA's Triton selection kernels (prefill and decode gating) choose what the torch selection chooses,
the attention sink and the local window included: on a GPU, and through Triton's interpreter on the CPU."""

from __future__ import annotations

from pathlib import Path

import moba_gate_checks
import pytest
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moba_selection_kernels_on_cuda() -> None:
    pytest.importorskip("triton")
    moba_gate_checks.check_prefill_gate("cuda")
    moba_gate_checks.check_decode_gate("cuda")
    moba_gate_checks.check_close_blocks("cuda")


def test_moba_selection_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import moba_gate_checks as c; "
        "c.check_prefill_gate('cpu'); c.check_decode_gate('cpu'); c.check_close_blocks('cpu')",
        HERE,
    )
