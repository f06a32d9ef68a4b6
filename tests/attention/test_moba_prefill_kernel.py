"""MoBA's prefill attention kernel (Triton) against the float64 loop oracle: on a GPU in bf16, and through
Triton's interpreter on the CPU in float32 (then lowered to an sm_90 binary), so CI checks its indexing."""

from __future__ import annotations

from pathlib import Path

import moba_prefill_checks
import pytest
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent
CPU_CASES = [(130, 2, 1, 32, 32, 3), (97, 4, 2, 64, 16, 2)]
# (tokens, heads, kv_heads, head_dim, chunk, topk, page, q_start, sink, window): chunks that start inside a
# KV page and inside a MoBA block, GQA groups 1-4, the sink and the window.
PAGED_CASES = [
    (150, 4, 1, 32, 32, 3, 16, 70, False, 0),
    (133, 2, 2, 64, 16, 4, 8, 37, True, 24),
    (96, 8, 2, 32, 32, 2, 16, 90, True, 0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moba_prefill_kernel_on_cuda() -> None:
    pytest.importorskip("triton")
    cases = CPU_CASES + [(300, 4, 2, 64, 32, 3), (257, 8, 8, 128, 64, 2), (200, 4, 1, 64, 16, 1)]
    moba_prefill_checks.check_prefill("cuda", cases, torch.bfloat16, 2e-2)


def test_moba_prefill_kernel_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        f"import torch, moba_prefill_checks as c; c.check_prefill('cpu', {CPU_CASES!r}, torch.float32, 1e-4)",
        HERE,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moba_paged_prefill_kernel_on_cuda() -> None:
    pytest.importorskip("triton")
    cases = PAGED_CASES + [
        (3000, 32, 8, 128, 512, 4, 16, 1000, True, 512),
        (700, 16, 2, 64, 128, 6, 16, 333, False, 0),
    ]
    moba_prefill_checks.check_paged_prefill("cuda", cases, torch.bfloat16, 2e-2)
    moba_prefill_checks.check_engine_spans("cuda")


def test_moba_paged_prefill_kernel_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import torch, moba_prefill_checks as c; "
        f"c.check_paged_prefill('cpu', {PAGED_CASES!r}, torch.float32, 1e-4); c.check_engine_spans('cpu')",
        HERE,
    )
