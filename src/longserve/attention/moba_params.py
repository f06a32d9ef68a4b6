"""MoBA's settings and their checks, torch-free (``config`` validates them without importing the engine)."""

from __future__ import annotations

MOBA_KERNEL_BLOCK = 16  # the GPU kernel's key tile: chunk sizes must be whole tiles


def validate_moba_params(chunk_size: int, topk: int, sink: bool = False, window: int = 0) -> None:
    """Raise ``ValueError`` unless chunk_size is a positive multiple of MOBA_KERNEL_BLOCK, topk >= 1, and the
    blocks ``sink`` and ``window`` force fit in the topk - 1 a query chooses."""
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
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"moba window must be a number of tokens >= 0, got {window!r}")
    forced = int(bool(sink)) + (-(-(window - 1) // chunk_size) if window > 1 else 0)
    if forced > topk - 1:
        raise ValueError(
            f"moba sink={bool(sink)} and window={window} force up to {forced} earlier blocks of {chunk_size} "
            f"tokens, but topk={topk} chooses {topk - 1}: raise topk to at least {forced + 1}"
        )
