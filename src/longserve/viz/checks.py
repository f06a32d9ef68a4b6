"""What a picture request may ask for: ``VizError`` and the checks that raise it (the CLI exits 2 on one)."""

from __future__ import annotations

from collections.abc import Sequence


class VizError(ValueError):
    """A request the pictures cannot be drawn for (bad layer or head index, no MoE layers, ...)."""


def check_indices(kind: str, chosen: Sequence[int], count: int) -> list[int]:
    """``chosen`` as a list, each in [0, count); otherwise ``VizError`` naming ``kind`` and the range."""
    if not chosen:
        raise VizError(f"no {kind}s chosen")
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise VizError(f"{kind} {bad[0]} is out of range: the model has {count} {kind}s (0..{count - 1})")
    return list(chosen)
