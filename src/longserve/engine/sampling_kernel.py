"""One-launch sampling on a GPU: temperature, top-k, top-p, min-p and the draw for every row of a step, with
no sort and no reading back, so a sampled step costs the host one launch instead of ~120 small torch ops.

Each program samples one row by passes over its logits:
1. the row's maximum and argmax (a greedy row stops here), and whether it holds a NaN or +inf;
2. with top-k: the k-th largest logit, by a radix select over the logits' ordered bit patterns (exact, 4
   histogram passes); ties with it are kept, as vLLM keeps them;
3. with top-p: the mass of what top-k keeps;
4. the draw: an exponential race (argmax of weight / Exp(1) noise, so no normalising pass) over the
   candidates, which start as what top-k and min-p keep. With top-p, one more pass sums the mass of tokens
   strictly more likely than the winner (no pass when the winner alone holds more than 1 - top_p of the
   top-k mass). Under top_p of the top-k mass, the winner is in the nucleus and is taken. Otherwise every
   token at or below it is outside the nucleus too; they leave the candidates and the race runs again.
   Conditioned on acceptance, a round's winner is distributed as the nucleus, so the result is exactly the
   filtered distribution; a round accepts with probability >= top_p.

Which tokens survive matches ``sampling_ops.target_probs`` (the reference) except among exactly tied
logits; the CPU samples rows without top-k by the same nucleus rule (``sampling_ops``). The noise is counter-based (Philox): a seeded row's comes from the uniform its generator
drew on the host, so it reproduces whatever else is in the batch; the others' from the step's seed.

Each row's parameters come from the device mirror of the sampling table, by row index. Importing this module
needs Triton; the sampler imports it only for CUDA logits (the CPU tests run the kernel under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.engine.sampling_table import GREEDY, MIN_P, TEMPERATURE, TOP_K, TOP_P


def default_tiles(rows: int) -> tuple[int, int]:
    """(logits per load, warps) for a batch of ``rows``. A program walks its row alone, so a small batch
    leaves most SMs idle and each pass is bound by load latency: wider loads with more warps take fewer
    trips. A large batch fills the GPU with programs and wants fewer registers each. (A first guess, not yet
    swept on a GPU: ``benchmarks/sampler_speed.py --kernel-configs``.)"""
    return (4096, 8) if rows <= 64 else (1024, 4)


@triton.jit
def _ordered_keys(x):
    """float32 -> int32 whose signed order is the floats' order (to select and compare by value as ints)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _kth_largest_key(base, offs, k, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """The ordered key of the row's k-th largest logit: a radix select, 8 bits a pass from the top (4 passes
    of 256-bin histograms over the logits whose higher bits match what is chosen so far)."""
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int64)  # the chosen high bits of the unsigned key
    remaining = k.to(tl.int32)  # how many of the matching logits lie at or above the answer
    for shift in tl.static_range(24, -1, -8):
        hist = tl.zeros([256], tl.int32)
        for start in range(0, VOCAB, BLOCK):
            index = start + offs
            x = tl.load(base + index, mask=index < VOCAB, other=-float("inf"))
            unsigned = _ordered_keys(x).to(tl.int64) + 2147483648  # [BLOCK] in [0, 2^32)
            match = ((unsigned >> (shift + 8)) == (prefix >> (shift + 8))) & (index < VOCAB)
            hist += tl.histogram(((unsigned >> shift) & 255).to(tl.int32), 256, mask=match)
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # [256]: digits >= each bin
        digit = tl.max(tl.where(at_or_above >= remaining, bins, -1), axis=0)
        remaining -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = prefix | (digit.to(tl.int64) << shift)
    return (prefix - 2147483648).to(tl.int32)


@triton.jit
def _sample_rows_kernel(
    logits_ptr,  # [n, vocab] float32
    stride_row,
    table_ptr,  # [table rows, 6] float64: temperature, top_k, top_p, min_p, greedy, seeded (sampling_table.py)
    rows_ptr,  # [n] int64: each logits row's row of the table
    uniform_ptr,  # [n] float64: a seeded row's host draw; NaN: use the step's seed
    step_seed_ptr,  # [1] int64
    token_ptr,  # [n] int64 out
    invalid_ptr,  # [n] int8 out: no distribution to draw from (NaN or +inf logits)
    VOCAB: tl.constexpr,  # (one compilation per model)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    lowest_key = tl.full([], -2147483648, tl.int32)

    # Pass 1: max, first argmax, and whether the row is a distribution at all.
    best = tl.full([], -float("inf"), tl.float32)
    best_index = tl.full([], 0, tl.int32)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, VOCAB, BLOCK):
        index = start + offs
        x = tl.load(base + index, mask=index < VOCAB, other=-float("inf"))  # [BLOCK]
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        block_best = tl.max(x, axis=0)
        block_index = start + tl.argmax(x, axis=0)
        better = block_best > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_best, best)
    invalid = (bad > 0) | (best == -float("inf"))
    token = tl.where(invalid, 0, best_index).to(tl.int64)

    params = table_ptr + tl.load(rows_ptr + row) * 6
    if (tl.load(params + 4) == 0.0) & (~invalid):
        inv_t = 1.0 / tl.load(params).to(tl.float32)
        top_k = tl.load(params + 1).to(tl.int64)
        top_p = tl.load(params + 2).to(tl.float32)
        min_p = tl.load(params + 3).to(tl.float32)
        best_key = _ordered_keys(best)
        # Candidates: logits whose ordered key is >= floor. min-p keeps weight exp((x - best) / T) >= min_p.
        floor = lowest_key
        if min_p > 0.0:
            floor = _ordered_keys(best + tl.log(min_p) / inv_t)
        k_floor = lowest_key
        if top_k < VOCAB:
            k_floor = _kth_largest_key(base, offs, top_k, VOCAB, BLOCK)
        floor = tl.maximum(floor, k_floor)
        threshold = top_p - 1e-6  # as the reference: mass within 1e-6 of top_p has reached it
        k_mass = tl.full([], 0.0, tl.float32)
        if top_p < 1.0:
            for start in range(0, VOCAB, BLOCK):
                index = start + offs
                x = tl.load(base + index, mask=index < VOCAB, other=-float("inf"))
                keep = (_ordered_keys(x) >= k_floor) & (index < VOCAB)
                k_mass += tl.sum(tl.where(keep, tl.exp((x - best) * inv_t), 0.0), axis=0)
        uniform = tl.load(uniform_ptr + row)
        seed = tl.where(uniform == uniform, uniform.to(tl.int64, bitcast=True), tl.load(step_seed_ptr) + row)
        attempt = tl.full([], 0, tl.int64)
        searching = tl.full([], 1, tl.int32)
        while searching != 0:
            # The race: the winner maximises log weight - log Exp(1), i.e. is drawn in proportion to weight.
            win_score = tl.full([], -float("inf"), tl.float32)
            win = best_index
            for start in range(0, VOCAB, BLOCK):
                index = start + offs
                x = tl.load(base + index, mask=index < VOCAB, other=-float("inf"))
                noise = tl.maximum(tl.rand(seed + attempt, index), 1e-12)
                score = (x - best) * inv_t - tl.log(-tl.log(noise))
                score = tl.where((_ordered_keys(x) >= floor) & (index < VOCAB), score, -float("inf"))
                block_score = tl.max(score, axis=0)
                block_win = start + tl.argmax(score, axis=0)
                won = block_score > win_score
                win = tl.where(won, block_win, win)
                win_score = tl.where(won, block_score, win_score)
            token = win.to(tl.int64)
            searching = tl.full([], 0, tl.int32)
            win_logit = tl.load(base + win)
            # The mass above the winner is at most the rest of the top-k mass: a likely winner needs no pass.
            if (top_p < 1.0) & (tl.exp((win_logit - best) * inv_t) <= (1.0 - threshold + 1e-5) * k_mass):
                win_key = _ordered_keys(win_logit)
                above = tl.full([], 0.0, tl.float32)
                for start in range(0, VOCAB, BLOCK):
                    index = start + offs
                    x = tl.load(base + index, mask=index < VOCAB, other=-float("inf"))
                    keys = _ordered_keys(x)
                    strictly = (keys > win_key) & (keys >= k_floor) & (index < VOCAB)
                    above += tl.sum(tl.where(strictly, tl.exp((x - best) * inv_t), 0.0), axis=0)
                # Outside the nucleus: so is every token at or below the winner (the best always survives).
                if (above >= threshold * k_mass) & (win_key < best_key):
                    searching = tl.full([], 1, tl.int32)
                    floor = win_key + 1
                    attempt += 1
    tl.store(token_ptr + row, token)
    tl.store(invalid_ptr + row, invalid.to(tl.int8))


def fused_sample_rows(
    logits: torch.Tensor,  # [n, vocab]
    table: torch.Tensor,  # [table rows, 6] float64, columns as sampling_table.py's
    rows: torch.Tensor,  # [n] int64
    uniform: torch.Tensor,  # [n] float64
    step_seed: torch.Tensor,  # [1] int64
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` tokens and ``[n]`` bool rows that were no distribution (their token is the argmax, or 0).
    ``block`` / ``num_warps``: the tiles (default: ``default_tiles``)."""
    assert (TEMPERATURE, TOP_K, TOP_P, MIN_P, GREEDY) == (0, 1, 2, 3, 4) and table.shape[1] == 6
    logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    default_block, default_warps = default_tiles(n)
    block, num_warps = block or default_block, num_warps or default_warps
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    invalid = torch.empty(n, dtype=torch.int8, device=logits.device)
    if n:
        _sample_rows_kernel[(n,)](
            logits, logits.stride(0), table, rows, uniform, step_seed, tokens, invalid,
            VOCAB=vocab, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return tokens, invalid.bool()
