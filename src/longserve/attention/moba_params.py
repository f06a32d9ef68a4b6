"""MoBA's settings and their checks, torch-free (``config`` validates them without importing the engine)."""

from __future__ import annotations

MOBA_KERNEL_BLOCK = 16  # the GPU kernel's key tile: chunk sizes must be whole tiles


def validate_moba_params(chunk_size: int, topk: int) -> None:
    """Raise ``ValueError`` unless chunk_size is a positive multiple of MOBA_KERNEL_BLOCK and topk >= 1."""
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or chunk_size < MOBA_KERNEL_BLOCK
        or chunk_size % MOBA_KERNEL_BLOCK
    ):
        raise ValueError(
            f"moba chunk_size must be a positive multiple of {MOBA_KERNEL_BLOCK}, got {chunk_size!r}"
        )
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"moba topk must be an integer >= 1 (it counts the query's own block), got {topk!r}")
