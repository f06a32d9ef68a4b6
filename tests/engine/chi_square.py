"""Chi-square goodness of fit, for the tests that check a sampler's output follows a distribution."""

from __future__ import annotations

import torch


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of ``counts`` to ``probs`` over the tokens of positive probability."""
    assert counts[probs == 0].sum() == 0, "a token of probability zero was emitted"
    keep = probs > 0
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(keep.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()
