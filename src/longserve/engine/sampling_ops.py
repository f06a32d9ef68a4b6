"""Row-wise sampling operations on a step's logits ``[rows, vocab]``: the top-k / top-p / min-p filters, the CDF
draw, greedy argmax and logprobs. Each works on any device without reading the device back when its
host-side arguments are given (``Sampler`` queues them so)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longserve.engine.protocol import TokenLogprob

# A float32 cumsum lands a hair below an exact boundary (0.5 + 0.3 -> 0.79999995): mass within this of top_p
# counts as having reached it, so the nucleus is the smallest set the user would compute by hand.
_TOP_P_TOLERANCE = 1e-6
# Top-p without top-k looks for its nucleus among the best 256, then 2048 tokens (a partial top-k), and sorts
# the whole vocabulary (~40x the cost of top-256) only when their mass falls short of top_p.
_TOP_P_CANDIDATES = (256, 2048)
# CPU argmax and CDF inversion go block-wise: reductions over contiguous blocks vectorise, while a full-row
# argmax or float64 cumsum runs element by element (~2x slower for one row, ~9x for sixteen).
_BLOCK = 256


@dataclass
class RowParams:
    """Each row's sampling parameters on the logits' device (one upload), with the host facts that steer
    the control flow, so choosing a path never waits for the device. Greedy rows carry neutral values."""

    temperature: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] int64, vocab = off
    top_p: torch.Tensor  # [n] float32, 1.0 = off
    min_p: torch.Tensor  # [n] float32, 0.0 = off
    uniform: torch.Tensor  # [n] float64: a seeded row's draw from its own generator; NaN: draw on the device
    greedy: torch.Tensor  # [n] bool
    host_top_k: list[int]
    host_top_p: list[float]
    any_min_p: bool
    any_seeded: bool
    any_greedy: bool = False


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    host_top_k: list[int] | None = None,
    host_top_p: list[float] | None = None,
) -> torch.Tensor:
    """Mask (-inf) everything outside each row's top-k, then outside the top-p nucleus of what is left.

    ``logits`` ``[n, vocab]``; ``top_k`` ``[n]`` (vocab = off); ``top_p`` ``[n]`` (1.0 = off). The nucleus is the
    smallest set of most likely tokens whose probability (renormalised after top-k) reaches top_p; the most
    likely token always survives. ``host_top_k`` / ``host_top_p``: the same values as host lists, so that
    choosing the path does not read them back from the device.
    """
    n, vocab = logits.shape
    ks = host_top_k if host_top_k is not None else top_k.tolist()
    ps = host_top_p if host_top_p is not None else top_p.tolist()
    if all(k >= vocab and p >= 1.0 for k, p in zip(ks, ps, strict=True)):
        return logits
    p_only = any(k >= vocab and p < 1.0 for k, p in zip(ks, ps, strict=True))
    # Top-p-only rows measure mass against the whole vocabulary; softmax works row by row, so these values
    # do not depend on the rest of the batch.
    probs = logits.softmax(dim=-1) if p_only else None  # [n, vocab]
    # Sorting the whole vocabulary is slow on a CPU, so rank only the best `width` tokens when that provably
    # holds every survivor: k of them for top-k rows, enough mass for top-p-only rows. Whether the mass
    # sufficed is a read of the device, so a GPU sorts the whole vocabulary for top-p-only rows instead.
    max_k = max((k for k in ks if k < vocab), default=0)
    if p_only:
        widths = [max(max_k, w) for w in _TOP_P_CANDIDATES] if logits.device.type == "cpu" else []
    else:
        widths = [max_k]
    remove = None
    for width in (w for w in widths if w < vocab):
        ranked, order = _topk(logits, width)  # [n, width] each, best first
        remove = _ranked_removal(ranked, order, probs, top_k, top_p, vocab, complete=not p_only)
        if remove is not None:
            break
    if remove is None:
        ranked, order = logits.sort(dim=-1, descending=True)  # [n, vocab] each
        remove = _ranked_removal(ranked, order, probs, top_k, top_p, vocab, complete=True)
    # Tokens outside the ranked candidates are removed, except in rows that filter nothing.
    filters = (top_k < vocab) | (top_p < 1.0)  # [n]
    mask = filters.unsqueeze(1).expand(n, vocab).clone()  # [n, vocab]
    mask.scatter_(1, order, remove)
    return logits.masked_fill(mask, -float("inf"))


def _ranked_removal(
    ranked: torch.Tensor,
    order: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    vocab: int,
    *,
    complete: bool,
) -> torch.Tensor | None:
    """Which of the best-first ``ranked`` logits ``[n, width]`` to drop; None if the nucleus may lie beyond.
    ``complete``: the ranking holds every survivor (all of the vocabulary, or top-k rows only), so no check.

    ``probs`` ``[n, vocab]`` is the full softmax, needed only when some row has top-p without top-k. Every
    quantity is a prefix computation (cumsum) over the ranking, so a row's result depends neither on
    ``width`` nor, hence, on the other rows of the batch.
    """
    width = ranked.shape[1]
    has_k, has_p = top_k < vocab, top_p < 1.0  # [n] each
    remove = torch.arange(width, device=ranked.device).unsqueeze(0) >= top_k.unsqueeze(1)  # [n, width]
    weight = (ranked - ranked[:, :1]).exp().masked_fill(remove, 0.0)  # [n, width]: best token weighs 1
    k_mass = weight.cumsum(dim=-1).gather(1, (top_k.clamp(max=width) - 1).unsqueeze(1))  # [n, 1]
    p = weight / k_mass  # [n, width]: renormalised over the top k
    if probs is not None:
        p = torch.where(has_k.unsqueeze(1), p, probs.gather(1, order))
    cum = p.cumsum(dim=-1)  # [n, width]
    threshold = (top_p - _TOP_P_TOLERANCE).unsqueeze(1)  # [n, 1]
    if not complete and not bool((has_k | ~has_p | (cum[:, -1] >= threshold[:, 0])).all()):
        return None
    remove |= (cum - p >= threshold) & has_p.unsqueeze(1)  # mass of strictly better tokens reaches top_p
    remove[:, 0] = False
    return remove


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose probability is below ``min_p`` times the row's best. ``probs`` ``[n, vocab]``."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [n, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def sample_rows(logits: torch.Tensor, params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of penalised ``logits`` ``[m, vocab]`` (greedy rows: their argmax): ``[m]``
    tokens, and ``[m]`` bool rows whose probabilities are no distribution (NaN, or nothing left). Those get
    some valid id, so the batch's other rows still get theirs; the caller fails them.

    On the CPU, draws that never touch the whole vocabulary more than a softmax does (``_sample_on_cpu``);
    elsewhere the reference's torch ops. (The sampler's usual GPU path is one kernel: ``sampling_kernel.py``.)"""
    if logits.device.type == "cpu":
        tokens, invalid = _sample_on_cpu(logits, params)
    else:
        probs, invalid = target_probs(logits, params)
        tokens = draw_tokens(probs, params.uniform, params.any_seeded)
    if params.any_greedy:
        tokens = torch.where(params.greedy, greedy_argmax(logits), tokens)
        invalid &= ~params.greedy
    return tokens, invalid


def _sample_on_cpu(logits: torch.Tensor, params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with top-k draw among their ranked best (``_sample_ranked``), the others from the softmax with a
    nucleus check (``_sample_nucleus_by_rejection``): neither sorts nor masks the whole vocabulary."""
    vocab = logits.shape[1]
    ranked = [i for i, k in enumerate(params.host_top_k) if k < vocab]
    if not ranked:
        return _sample_nucleus_by_rejection(logits, params)
    if len(ranked) == len(params.host_top_k):
        return _sample_ranked(logits, params)
    ranked_set = set(ranked)
    rest = [i for i in range(len(params.host_top_k)) if i not in ranked_set]
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    invalid = torch.empty(logits.shape[0], dtype=torch.bool)
    for rows, sample in ((ranked, _sample_ranked), (rest, _sample_nucleus_by_rejection)):
        index = torch.tensor(rows)
        part_tokens, part_invalid = sample(
            logits.index_select(0, index), _params_of_rows(params, rows, index)
        )
        tokens.index_copy_(0, index, part_tokens)
        invalid.index_copy_(0, index, part_invalid)
    return tokens, invalid


def _params_of_rows(params: RowParams, rows: list[int], index: torch.Tensor) -> RowParams:
    """The parameters of ``rows`` (``index`` as a tensor) alone."""
    return RowParams(
        temperature=params.temperature.index_select(0, index),
        top_k=params.top_k.index_select(0, index),
        top_p=params.top_p.index_select(0, index),
        min_p=params.min_p.index_select(0, index),
        uniform=params.uniform.index_select(0, index),
        greedy=params.greedy.index_select(0, index),
        host_top_k=[params.host_top_k[i] for i in rows],
        host_top_p=[params.host_top_p[i] for i in rows],
        any_min_p=params.any_min_p,
        any_seeded=params.any_seeded,
    )


def _sample_nucleus_by_rejection(
    logits: torch.Tensor, params: RowParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows without top-k, with no sort and no top-k search: draw from the softmax (min-p applied), then keep
    a row's token if the mass strictly more likely than it is under top_p. A row that drew outside its
    nucleus drops every token no more likely than the one drawn (all outside too) and draws again; given
    acceptance a draw follows the nucleus, so the result is exactly ``target_probs``' distribution. A round
    accepts with probability >= top_p, so few rows redraw. The GPU kernel (``sampling_kernel.py``) samples
    by the same rule."""
    probs = (logits / params.temperature.unsqueeze(1)).softmax(dim=-1)  # [m, vocab]
    weights = apply_min_p(probs, params.min_p) if params.any_min_p else probs  # what a draw picks from
    invalid = ~(weights.sum(dim=-1) > 0)  # [m]; a NaN anywhere makes the sum NaN
    if invalid.any():
        weights = weights.masked_fill(invalid.unsqueeze(1), 1.0)
    tokens = draw_tokens(weights, params.uniform, params.any_seeded)  # [m]
    threshold = params.top_p - _TOP_P_TOLERANCE  # [m]
    # The mass above a token is at most 1 - its probability: a likely draw is in its nucleus without a pass.
    # (1e-5: the softmax's sum is 1 only up to float32 rounding)
    sure = probs.gather(1, tokens.unsqueeze(1)).squeeze(1) > 1.0 - threshold + 1e-5  # [m]
    rows = [i for i in (~sure).nonzero().flatten().tolist() if params.host_top_p[i] < 1.0]
    redraws = 0
    while rows:
        index = torch.tensor(rows)
        row_probs = probs.index_select(0, index)  # [r, vocab]
        chosen = row_probs.gather(1, tokens.index_select(0, index).unsqueeze(1))  # [r, 1]
        below = row_probs <= chosen  # [r, vocab]
        above = row_probs.masked_fill(below, 0.0).sum(dim=-1)  # [r]
        # (nothing above: the most likely token, which every nucleus keeps, even a top_p below float32's range)
        outside = (above >= threshold.index_select(0, index)) & (above > 0) & ~invalid.index_select(0, index)
        if not outside.any():
            break
        redraws += 1
        rows = [rows[j] for j in outside.nonzero().flatten().tolist()]
        index = torch.tensor(rows)
        if weights is probs:  # (edited in place below; probs must stay whole for the next round's check)
            weights = probs.clone()
        kept = weights.index_select(0, index).masked_fill(below[outside], 0.0)
        weights.index_copy_(0, index, kept)
        uniform = _redraw_uniforms(params.uniform.index_select(0, index), redraws)
        tokens = tokens.index_copy(0, index, draw_tokens(kept, uniform, any_seeded=True))
    return tokens, invalid


def _sample_ranked(logits: torch.Tensor, params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that all have top-k: rank each row's best max(k) logits (the temperature keeps their order),
    filter and draw among them alone, never over the whole vocabulary."""
    vocab = logits.shape[1]
    width = max(params.host_top_k)
    ranked, order = _topk(logits, width)  # [m, width] each, best first
    ranked = ranked / params.temperature.unsqueeze(1)
    remove = _ranked_removal(ranked, order, None, params.top_k, params.top_p, vocab, complete=True)
    weights = (ranked - ranked[:, :1]).exp().masked_fill(remove, 0.0)  # [m, width]: the best weighs 1
    if params.any_min_p:  # below min_p times the best's probability, i.e. a weight below min_p
        weights = weights.masked_fill(weights < params.min_p.unsqueeze(1), 0.0)
    invalid = ~(weights.sum(dim=-1) > 0)  # [m]; NaN or infinite logits rank first and make it NaN
    weights = weights.masked_fill(invalid.unsqueeze(1), 1.0).double()
    fresh = torch.rand(weights.shape[0], dtype=torch.float64)
    uniform = torch.where(params.uniform.isnan(), fresh, params.uniform) if params.any_seeded else fresh
    index, _ = _invert_cdf(weights, uniform.unsqueeze(1))  # [m, 1]
    return order.gather(1, index).squeeze(1), invalid


def _redraw_uniforms(uniform: torch.Tensor, redraws: int) -> torch.Tensor:
    """Fresh uniforms ``[r]`` float64 for rows drawing again: a seeded row's from a generator seeded by its
    step's uniform (so it reproduces), the others' from torch's default generator."""
    fresh = torch.rand(uniform.shape[0], dtype=torch.float64)
    for i, u in enumerate(uniform.tolist()):
        if not math.isnan(u):
            bits = int(torch.tensor(u, dtype=torch.float64).view(torch.int64)) + redraws
            fresh[i] = torch.rand(
                1, dtype=torch.float64, generator=torch.Generator().manual_seed(bits)
            ).item()
    return fresh


def target_probs(logits: torch.Tensor, params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution each row samples from, unnormalised ``[m, vocab]``: temperature, top-k, top-p, min-p
    applied to penalised ``logits``; and ``[m]`` bool rows that are no distribution (made uniform)."""
    logits = logits / params.temperature.unsqueeze(1)  # [m, vocab]
    vocab = logits.shape[1]
    if any(k < vocab for k in params.host_top_k) or any(p < 1.0 for p in params.host_top_p):
        logits = apply_top_k_top_p(
            logits, params.top_k, params.top_p, host_top_k=params.host_top_k, host_top_p=params.host_top_p
        )
    probs = logits.softmax(dim=-1)  # [m, vocab]
    if params.any_min_p:
        probs = apply_min_p(probs, params.min_p)
    invalid = ~(probs.sum(dim=-1) > 0)  # [m]; a NaN anywhere makes the sum NaN
    return probs.masked_fill(invalid.unsqueeze(1), 1.0), invalid


def draw_tokens(probs: torch.Tensor, uniform: torch.Tensor, any_seeded: bool) -> torch.Tensor:
    """One token per row of (unnormalised) ``probs`` ``[m, vocab]``, by inverting the row's CDF at a uniform:
    ``uniform`` ``[m]`` float64 where a row brings its own (seeded), NaN where one is drawn here.

    One uniform per row (the exponential race needs one per vocabulary entry, ~30x a softmax on CPU). The
    CDF is inverted block-wise: pick the block by block masses, then the token inside it, reusing the rest
    of the uniform.
    """
    fresh = torch.rand(uniform.shape[0], 1, dtype=torch.float64, device=probs.device)  # [m, 1]
    given = uniform.unsqueeze(1)
    uniform = torch.where(given.isnan(), fresh, given) if any_seeded else fresh
    # float32 block sums: a float64 upcast of the whole row would cost more than the softmax.
    block_mass = _block_reduce(probs, torch.sum).double()  # [m, blocks]
    block, fraction = _invert_cdf(block_mass, uniform)  # [m, 1] each
    within, _ = _invert_cdf(_block_entries(probs, block, 0.0).double(), fraction)
    return (block * _BLOCK + within).squeeze(1)


def _invert_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index whose cumulative ``weights`` ``[m, w]`` (float64) exceed ``uniform * total``.

    Also returns how far into that entry's weight the target fell, in [0, 1]: a fresh uniform for a second
    stage. The target stays strictly below the total, so the chosen entry is a step up of the CDF, i.e. a
    token of positive probability, whatever the rounding.
    """
    cdf = weights.cumsum(dim=-1)  # [m, w]
    total = cdf[:, -1:]  # [m, 1]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))  # [m, 1]
    index = torch.searchsorted(cdf, target, right=True)  # [m, 1]
    weight = weights.gather(1, index)  # [m, 1]
    fraction = ((target - (cdf.gather(1, index) - weight)) / weight).clamp_(0.0, 1.0)  # [m, 1]
    return index, fraction


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of ``logits`` ``[n, vocab]`` -> ``[n]``; ties go to the lowest id, as ``torch.argmax``."""
    n, vocab = logits.shape
    if logits.device.type != "cpu" or vocab < 4 * _BLOCK or logits.stride(1) != 1:
        return logits.argmax(dim=-1)
    main = vocab - vocab % _BLOCK
    blocks = logits[:, :main].view(n, main // _BLOCK, _BLOCK)  # [n, blocks, B]
    block_max, block = blocks.amax(dim=-1).max(dim=-1)  # [n] each: first block holding the max
    best = block * _BLOCK + blocks[torch.arange(n), block].argmax(dim=-1)  # [n]
    if main < vocab:  # a short last block wins only if strictly better (ties keep the lower id)
        tail_max, tail_arg = logits[:, main:].max(dim=-1)  # [n] each
        best = torch.where(tail_max > block_max, main + tail_arg, best)
    return best


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)`` over rows of ``[n, vocab]``; on CPU it searches only the k blocks with the highest maxima
    (which must hold the k best), several times faster for small k."""
    n, vocab = x.shape
    if x.device.type != "cpu" or vocab % _BLOCK or 2 * k * _BLOCK > vocab or x.stride(1) != 1:
        return x.topk(k, dim=-1)
    blocks = x.view(n, vocab // _BLOCK, _BLOCK).amax(dim=-1).topk(k, dim=-1).indices  # [n, k]
    index = (blocks.unsqueeze(2) * _BLOCK + torch.arange(_BLOCK, device=x.device)).view(n, k * _BLOCK)
    values, position = x.gather(1, index).topk(k, dim=-1)  # [n, k] each
    return values, index.gather(1, position)


def _block_reduce(x: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` over consecutive ``_BLOCK``-wide blocks of each row: ``[n, vocab]`` -> ``[n, blocks]``."""
    n, vocab = x.shape
    main = vocab - vocab % _BLOCK
    out = reduce(x[:, :main].view(n, main // _BLOCK, _BLOCK), dim=-1)  # [n, main / B]
    if main < vocab:  # a short last block
        out = torch.cat([out, reduce(x[:, main:], dim=-1, keepdim=True)], dim=1)
    return out


def _block_entries(x: torch.Tensor, block: torch.Tensor, fill: float) -> torch.Tensor:
    """Entries of block ``block[i]`` of row i: ``[n, _BLOCK]``, ``fill`` past the end of a short last block."""
    index = block * _BLOCK + torch.arange(_BLOCK, device=x.device)  # [n, B]
    if x.shape[1] % _BLOCK == 0:
        return x.gather(1, index)
    entries = x.gather(1, index.clamp(max=x.shape[1] - 1))
    return entries.masked_fill(index >= x.shape[1], fill)


def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """Logprob, rank (1 = best) and ``num_top[i]`` best alternatives of ``token_ids[i]`` under row i.

    ``logits`` ``[n, vocab]`` are raw model logits; a tie with the chosen token does not worsen its rank.
    """
    if not token_ids:
        return []
    chosen = torch.tensor(token_ids, device=logits.device)
    tensors = logprob_tensors(logits, chosen, max(num_top))
    return logprob_entries(token_ids, *(t.tolist() for t in tensors), num_top)


def logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """On the logits' device: the chosen tokens' logprobs ``[n]`` and ranks ``[n]``, and the ``k`` best
    alternatives' logprobs and ids ``[n, k]`` each, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [n, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [n]
    top_values, top_ids = _topk(logprobs, min(k, logprobs.shape[1]))  # [n, k] each
    return chosen.squeeze(1), ranks, top_values, top_ids


def logprob_entries(
    token_ids: list[int],
    chosen: list[float],
    ranks: list[int],
    top_values: list[list[float]],
    top_ids: list[list[int]],
    num_top: list[int],
) -> list[TokenLogprob]:
    """``logprob_tensors``' results, read back to host lists, as one ``TokenLogprob`` per row."""
    return [
        TokenLogprob(token, value, rank, list(zip(ids[:num], values[:num], strict=True)))
        for token, value, rank, ids, values, num in zip(
            token_ids, chosen, ranks, top_ids, top_values, num_top, strict=True
        )
    ]
