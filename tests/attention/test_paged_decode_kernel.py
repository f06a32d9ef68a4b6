"""The dense paged decode kernel (Triton) against float64 attention: on a GPU over contexts of 1 to 40K keys,
and through Triton's interpreter on the CPU in float32 (so CI checks its indexing and masking without a GPU;
the interpreter mishandles bf16). Head sizes 64 and 128 and MLA's 24 and 192 (padded to a power of two
inside), GQA groups 1 to 8."""

from __future__ import annotations

from pathlib import Path

import paged_decode_checks
import pytest
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_decode_matches_float64_attention_on_cuda() -> None:
    pytest.importorskip("triton")
    from longserve.attention.paged_decode import dense_splits

    lens = [1, 17, 300, 4096, 40_000, 2, 1023]
    # The engine's split counts: sized for this batch's longest context, and for a 139K-token model.
    splits = sorted({dense_splits(len(lens) * 2, n, torch.device("cuda")) for n in (max(lens), 139_264)})
    paged_decode_checks.check_dense_decode("cuda", lens, (64, 128, 192), (1, 2, 4, 8), splits + [1, 7])


def test_dense_decode_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import torch, paged_decode_checks as c; "
        "c.check_dense_decode('cpu', [1, 17, 130], (24, 64, 192), (1, 4), (1, 3), torch.float32)",
        HERE,
    )
