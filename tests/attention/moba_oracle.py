"""MoBA oracle: the explicit [heads, tokens, tokens] MoBA mask, built with plain loops, and dense masked softmax
attention in float64. Shares no code with longserve's MoBA; slow, so for short sequences only."""

from __future__ import annotations

import torch


def moba_mask_oracle(
    q: torch.Tensor, k: torch.Tensor, chunk_size: int, topk: int, sink: bool = False, window: int = 0
) -> torch.Tensor:
    """One sequence: q [n, heads, d], k [n, kv_heads, d] -> bool [heads, n, n], True where query t sees key j.

    ``sink``: block 0 is always among the topk - 1 earlier blocks; ``window``: so are the blocks holding the
    tokens t - window + 1 .. t; the rest of the choices go by score."""
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    q, k = q.double(), k.double()
    num_complete = n // chunk_size
    gate = [
        k[b * chunk_size : (b + 1) * chunk_size].mean(dim=0) for b in range(num_complete)
    ]  # [kv_heads, d]
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    for t in range(n):
        own = t // chunk_size
        for h in range(heads):
            scores = [float(q[t, h] @ gate[b][h // group]) for b in range(own)]
            forced = [
                b
                for b in range(own)
                if (sink and b == 0) or (window and b >= max(0, t - window + 1) // chunk_size)
            ]
            # Best score first; among equal scores the earlier block.
            ranked = sorted((b for b in range(own) if b not in forced), key=lambda b, s=scores: (-s[b], b))
            for b in (forced + ranked)[: topk - 1]:
                mask[h, t, b * chunk_size : (b + 1) * chunk_size] = True
            mask[h, t, own * chunk_size : t + 1] = True
    return mask


def masked_attention_oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense float64 softmax attention restricted to ``mask`` [heads, n, n]: -> [n, heads, d]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def moba_attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """Packed sequences as in ``moba_attention_reference``; float64 result."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, start = [], 0
    for n in seq_lens:
        rows = slice(start, start + n)
        mask = moba_mask_oracle(q[rows], k[rows], chunk_size, topk, sink, window)
        outs.append(masked_attention_oracle(q[rows], k[rows], v[rows], mask, scale))
        start += n
    return torch.cat(outs)
