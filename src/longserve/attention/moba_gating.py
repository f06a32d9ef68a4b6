"""MoBA gating: which earlier key blocks each query attends to, and the key mask that selection implies.

Blocks are ``chunk_size`` tokens counted from the start of the sequence. A block's gate key is the mean of
its keys (after RoPE), per KV head. A query at position t scores every complete, strictly earlier block
(blocks ``0 .. t // chunk_size - 1``) against its own query head (GQA: query head h reads KV head
``h // (heads // kv_heads)``), keeps the ``topk - 1`` best (ties go to the earlier block), and always adds its
own block, attended causally. Everything here is plain PyTorch on any device; gating runs in float32
(float64 for float64 inputs) whatever the model's dtype, so every backend selects the same blocks.
"""

from __future__ import annotations

import torch

SELECT_ROWS = 1024  # query rows scored at once: bounds the [rows, heads, blocks] score tensor


def gating_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def moba_gate_keys(k: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean key of every complete chunk: k [keys, kv_heads, d] (positions 0..) -> [num_chunks, kv_heads, d].

    A trailing partial chunk has no gate key: no query ever scores it (it is at best the query's own block).
    """
    num_chunks = k.shape[0] // chunk_size
    chunks = k[: num_chunks * chunk_size].to(gating_dtype(k.dtype))
    return chunks.view(num_chunks, chunk_size, *k.shape[1:]).mean(dim=1)


def gate_scores(q: torch.Tensor, gate_keys: torch.Tensor) -> torch.Tensor:
    """q [tokens, heads, d] · gate_keys [blocks, kv_heads, d] -> [tokens, heads, blocks], per query head."""
    tokens, heads, dim = q.shape
    kv_heads = gate_keys.shape[1]
    grouped = q.to(gate_keys.dtype).view(tokens, kv_heads, heads // kv_heads, dim)
    return torch.einsum("tkgd,bkd->tkgb", grouped, gate_keys).reshape(tokens, heads, -1)


def forced_blocks(
    positions: torch.Tensor, num_blocks: int, chunk_size: int, sink: bool, window: int
) -> torch.Tensor | None:
    """[tokens, num_blocks] bool: the earlier blocks a query at ``positions`` attends whatever its gating
    says (they take the first of its topk - 1 choices): block 0 with ``sink`` (the attention sink models
    not trained with MoBA lean on), and the blocks holding the last ``window`` tokens up to the query. None
    when neither is on."""
    if not sink and not window:
        return None
    blocks = torch.arange(num_blocks, device=positions.device)[None, :]  # [1, blocks]
    own = (positions // chunk_size)[:, None]  # [tokens, 1]
    forced = (blocks == 0) & bool(sink)
    if window:
        forced = forced | (blocks >= ((positions - window + 1).clamp(min=0) // chunk_size)[:, None])
    return forced & (blocks < own)


def pick_blocks(
    scores: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int,
    topk: int,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """The ``topk - 1`` best earlier blocks per query row and head (the ``forced_blocks`` first): scores
    [tokens, heads, blocks] -> long [tokens, heads, topk - 1], best first, -1 where the query has fewer
    earlier blocks than that."""
    tokens, heads, num_blocks = scores.shape
    picks = topk - 1
    positions = positions.to(scores.device)
    own = positions // chunk_size  # [tokens]
    if picks == 0:
        return torch.empty(tokens, heads, 0, dtype=torch.long, device=scores.device)
    earlier = torch.arange(num_blocks, device=scores.device)[None, :] < own[:, None]  # [tokens, blocks]
    scores = scores.masked_fill(~earlier[:, None, :], float("-inf"))
    forced = forced_blocks(positions, num_blocks, chunk_size, sink, window)
    if forced is not None:
        scores = scores.masked_fill(forced[:, None, :], float("inf"))
    # Stable descending sort: equal scores keep block order, so a tie goes to the earlier block (topk does
    # not promise that). Masked blocks all come after the earlier ones, which have lower indices.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :picks]
    if order.shape[-1] < picks:
        order = torch.nn.functional.pad(order, (0, picks - order.shape[-1]), value=-1)
    available = own.clamp(max=picks)  # [tokens] earlier blocks a query can pick
    valid = torch.arange(picks, device=scores.device)[None, :] < available[:, None]  # [tokens, picks]
    return order.masked_fill(~valid[:, None, :], -1)


def select_moba_blocks(
    q: torch.Tensor,
    gate_keys: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int,
    topk: int,
    sink: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """Chosen earlier blocks of one sequence's queries: q [tokens, heads, d] at absolute ``positions``
    [tokens], gate_keys [num_chunks, kv_heads, d] -> long [tokens, heads, topk - 1] (-1 where none)."""
    out = torch.empty(q.shape[0], q.shape[1], topk - 1, dtype=torch.long, device=q.device)
    for start in range(0, q.shape[0], SELECT_ROWS):
        rows = slice(start, start + SELECT_ROWS)
        scores = gate_scores(q[rows], gate_keys)
        out[rows] = pick_blocks(scores, positions[rows], chunk_size, topk, sink, window)
    return out


def moba_attention_bias(
    selected: torch.Tensor, positions: torch.Tensor, num_keys: int, chunk_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [heads, tokens, num_keys] of ``dtype``: 0 where query row i (at
    ``positions[i]``) attends key j (at position j), -inf elsewhere. Attended: keys of the selected blocks
    (``selected`` [tokens, heads, topk - 1], -1 = none) and keys of the query's own block up to the query."""
    tokens, heads, _ = selected.shape
    device = selected.device
    num_blocks = -(-num_keys // chunk_size)
    own = positions.to(device) // chunk_size  # [tokens]
    # Block level first, one spare column absorbing the -1 (no block) entries; then widened to keys by
    # repetition, far cheaper than gathering a [heads, tokens, keys] mask key by key.
    blocks = torch.full((heads, tokens, num_blocks + 1), float("-inf"), dtype=dtype, device=device)
    blocks.scatter_(-1, selected.masked_fill(selected < 0, num_blocks).transpose(0, 1), 0.0)
    blocks.scatter_(-1, own.view(1, tokens, 1).expand(heads, tokens, 1), 0.0)
    bias = blocks[..., :num_blocks].repeat_interleave(chunk_size, dim=-1)[..., :num_keys]  # a fresh tensor
    # Chosen blocks all precede the query's own block, so the keys after the query are exactly the future.
    future = torch.arange(num_keys, device=device)[None, :] > positions.to(device)[:, None]  # [tokens, keys]
    return bias.masked_fill_(future[None], float("-inf"))
