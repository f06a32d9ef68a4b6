"""The one-launch sampling kernel keeps the reference's filtered distributions, greedy rows, seeds and invalid
rows: on a GPU, and through Triton's interpreter on the CPU (fewer samples there: it runs ~20 ms a row)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sampling_kernel_checks
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_kernel_on_cuda() -> None:
    sampling_kernel_checks.check_all("cuda")


def test_sampling_kernel_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    code = "import sampling_kernel_checks; sampling_kernel_checks.check_all('cpu', rows=120); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_sampling_kernel_compiles_for_hopper() -> None:
    """Triton lowers the kernel to an sm_90 binary without a GPU: CI catches what the interpreter forgives
    (types that change in a loop, constexpr rules)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longserve.engine.sampling_kernel import _sample_rows_kernel

    pointers = dict(logits_ptr="*fp32", temperature_ptr="*fp32", top_k_ptr="*i64", top_p_ptr="*fp32",
                    min_p_ptr="*fp32", uniform_ptr="*fp64", greedy_ptr="*i1", step_seed_ptr="*i64",
                    token_ptr="*i64", invalid_ptr="*i8")  # fmt: skip
    signature = dict(pointers, stride_row="i64", VOCAB="constexpr", BLOCK="constexpr")
    source = ASTSource(_sample_rows_kernel, signature, constexprs={"VOCAB": 128256, "BLOCK": 1024})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]
