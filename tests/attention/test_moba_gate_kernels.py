"""MoBA's Triton selection kernels (prefill top-k, decode gating) choose what the torch selection chooses,
the attention sink and the local window included: on a GPU, and through Triton's interpreter on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moba_gate_checks
import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moba_selection_kernels_on_cuda() -> None:
    pytest.importorskip("triton")
    moba_gate_checks.check_prefill_topk("cuda")
    moba_gate_checks.check_decode_gate("cuda")


def test_moba_selection_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    code = (
        "import triton_interpreter; triton_interpreter.allow_loaded_loop_bounds(); import moba_gate_checks as c; "
        "c.check_prefill_topk('cpu'); c.check_decode_gate('cpu'); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
