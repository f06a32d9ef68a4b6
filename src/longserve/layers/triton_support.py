"""When the Triton kernels run: on CUDA tensors, where Triton imports (a CPU or a Triton-less install uses torch)."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True for a CUDA tensor when Triton is installed; the caller then launches its Triton kernel."""
    return t.is_cuda and triton_importable()
