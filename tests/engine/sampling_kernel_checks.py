"""Checks of the one-launch sampling kernel (``sampling_kernel.py``) against the torch reference
(``sampling_ops.target_probs``): on CUDA, or on the CPU under TRITON_INTERPRET=1 (test_sampling_kernel.py
runs them both ways). Each filter's empirical distribution must fit the reference's (chi-square), and a
kernel that skipped a filter's renormalisation fails that fit."""

from __future__ import annotations

import math

import torch
from chi_square import p_value

from longserve.engine.sampling_kernel import fused_sample_rows
from longserve.engine.sampling_ops import RowParams, target_probs


def _params(n: int, vocab: int, device: str, *, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0,
            greedy=False, uniform=math.nan) -> RowParams:  # fmt: skip
    k = top_k if top_k is not None else vocab
    return RowParams(
        temperature=torch.full((n,), temperature, device=device),
        top_k=torch.full((n,), k, dtype=torch.int64, device=device),
        top_p=torch.full((n,), top_p, device=device),
        min_p=torch.full((n,), min_p, device=device),
        uniform=torch.full((n,), uniform, dtype=torch.float64, device=device),
        greedy=torch.full((n,), greedy, dtype=torch.bool, device=device),
        host_top_k=[k] * n,
        host_top_p=[top_p] * n,
        any_min_p=min_p > 0,
        any_seeded=not math.isnan(uniform),
    )


def _sample(
    logits: torch.Tensor, params: RowParams, seed: int = 7, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on ``params``' rows, laid out as the sampling table's device mirror (shuffled, so a row's
    parameters are found by its index, not its position)."""
    n = logits.shape[0]
    columns = [params.temperature.double(), params.top_k.double(), params.top_p.double(),
               params.min_p.double(), params.greedy.double(), (~params.uniform.isnan()).double()]  # fmt: skip
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(logits.device)
    table = torch.empty(n, 6, dtype=torch.float64, device=logits.device)
    table[rows] = torch.stack(columns, dim=1)
    step_seed = torch.tensor([seed], device=logits.device)
    return fused_sample_rows(logits, table, rows, params.uniform, step_seed, block=block)


def check_filtered_distributions(device: str, rows: int) -> None:
    """Temperature, top-k, top-p, min-p and their mixes: ``rows`` copies of one row (each draws its own
    noise: the step's seed + its row) fit the reference's distribution."""
    g = torch.Generator().manual_seed(3)
    vocab = 40
    row = (torch.randn(vocab, generator=g) * 1.5).to(device)
    settings = [
        dict(temperature=0.7),
        dict(top_p=0.8),
        dict(top_k=5),
        dict(temperature=1.3, top_k=12, top_p=0.7),
        dict(top_p=0.9, min_p=0.1),
    ]
    for setting in settings:
        params = _params(rows, vocab, device, **setting)
        logits = row.expand(rows, vocab).contiguous()
        tokens, invalid = _sample(logits, params)
        assert not invalid.any()
        reference, _ = target_probs(row.unsqueeze(0).cpu(), _params(1, vocab, "cpu", **setting))
        counts = torch.bincount(tokens.cpu(), minlength=vocab)
        assert p_value(counts, reference[0]) > 1e-3, setting
    # A nucleus measured before top-k's renormalisation keeps more tokens: the fit would see any of them.
    setting = dict(top_k=6, top_p=0.6)
    tokens, _ = _sample(row.expand(rows, vocab).contiguous(), _params(rows, vocab, device, **setting))
    counts = torch.bincount(tokens.cpu(), minlength=vocab)
    probs = row.cpu().softmax(-1)
    order = probs.argsort(descending=True)
    unrenormalised = torch.zeros(vocab)
    kept = order[: int((probs[order].cumsum(0) - probs[order] < 0.6).sum())][:6]
    unrenormalised[kept] = probs[kept]
    reference, _ = target_probs(row.unsqueeze(0).cpu(), _params(1, vocab, "cpu", **setting))
    assert (unrenormalised > 0).sum() > (reference[0] > 0).sum()  # p_value fails on any token beyond
    assert p_value(counts, reference[0]) > 1e-3


def check_large_vocabulary(device: str) -> None:
    for block in (1024, None):  # several loads with a short last one; the batch's own tiles
        _check_large_vocabulary(device, block)


def _check_large_vocabulary(device: str, block: int | None) -> None:
    """Greedy, top-k and a tight nucleus stay exact over a 2,500-token vocabulary."""
    g = torch.Generator().manual_seed(5)
    vocab, n = 2500, 8
    logits = (torch.randn(n, vocab, generator=g) * 2).to(device)
    logits[:, 2499] += 12  # the best token in the short last load
    logits[3, 1100] += 20
    best = logits.argmax(-1)
    tokens, _ = _sample(logits, _params(n, vocab, device, greedy=True), block=block)
    assert torch.equal(tokens, best)
    for tight in (dict(top_p=1e-3), dict(top_p=0.05, top_k=7)):
        tokens, _ = _sample(logits, _params(n, vocab, device, **tight), block=block)
        assert torch.equal(tokens, best), tight
    tokens, _ = _sample(logits, _params(n, vocab, device, top_k=1, temperature=2.0), block=block)
    assert torch.equal(tokens, best)
    top3 = logits.topk(3, dim=-1).indices
    for seed in range(4):
        tokens, _ = _sample(
            logits, _params(n, vocab, device, top_k=3, temperature=5.0), seed=seed, block=block
        )
        assert (top3 == tokens.unsqueeze(1)).any(dim=1).all()
    tokens, _ = _sample(logits, _params(n, vocab, device, min_p=0.999), block=block)
    assert torch.equal(tokens, best)


def check_seeds_and_invalid_rows(device: str) -> None:
    """A seeded row's token depends on its own uniform only; a NaN row is flagged and its token a valid id."""
    g = torch.Generator().manual_seed(9)
    vocab, n = 300, 6
    logits = torch.randn(n, vocab, generator=g).to(device)
    seeded = _params(n, vocab, device, uniform=0.25, temperature=1.5)
    first, _ = _sample(logits, seeded, seed=1)
    again, _ = _sample(logits, seeded, seed=2)  # another step seed: seeded rows do not use it
    assert torch.equal(first, again)
    shuffled, _ = _sample(logits.flip(0), seeded, seed=3)
    assert torch.equal(shuffled.flip(0), first)
    fresh = [_sample(logits, _params(n, vocab, device, temperature=1.5), seed=s)[0] for s in range(3)]
    assert not all(torch.equal(fresh[0], f) for f in fresh[1:])
    broken = logits.clone()
    broken[2, 17] = float("nan")
    broken[4, 3] = float("inf")
    tokens, invalid = _sample(broken, _params(n, vocab, device, top_p=0.9))
    assert invalid.tolist() == [False, False, True, False, True, False]
    assert ((tokens >= 0) & (tokens < vocab)).all()


def check_all(device: str, rows: int = 20_000) -> None:
    check_filtered_distributions(device, rows)
    check_large_vocabulary(device)
    check_seeds_and_invalid_rows(device)
