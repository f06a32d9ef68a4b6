"""The paged prefill kernel (Triton) against float64 causal attention: on a GPU in bf16, and through Triton's
interpreter on the CPU in float32 (CI has no GPU; the interpreter mishandles bf16)."""

from __future__ import annotations

from pathlib import Path

import paged_prefill_checks
import pytest
import torch
import triton_interpreter

HERE = Path(__file__).resolve().parent
# (cached prefix, chunk): a fresh prompt, prefixes ending inside and at the end of a block, a one-query
# chunk (a decode), chunks that span several tiles (the last after several key blocks every row sees).
CHUNKS = [(0, 37), (21, 16), (48, 5), (130, 1), (7, 70), (200, 70)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_prefill_matches_float64_attention_on_cuda() -> None:
    pytest.importorskip("triton")
    chunks = CHUNKS + [(4000, 2048), (0, 1000), (31_000, 333)]
    paged_prefill_checks.check_paged_prefill("cuda", chunks, (64, 128), (1, 2, 4, 8))


def test_paged_prefill_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        f"import torch, paged_prefill_checks as c; c.check_paged_prefill('cpu', {CHUNKS!r}, (64, 24), (1, 4), torch.float32)",
        HERE,
    )
