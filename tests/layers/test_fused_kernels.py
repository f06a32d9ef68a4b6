"""The fused Triton kernels (RMSNorm + residual, rotary, SiLU·mul, K/V store) equal float64 references: on a
GPU, and through Triton's interpreter on the CPU (so CI checks the kernels' indexing without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fused_checks
import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_on_cuda() -> None:
    fused_checks.check_all("cuda")


def test_fused_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    code = "import fused_checks; fused_checks.check_all('cpu'); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
