"""Attention heatmaps: the reference backend's masked-softmax weights of chosen layers and heads on a prompt.

Every layer runs the ``reference`` backend (the oracle); the chosen layers' backends carry a recording hook,
so what is drawn is exactly the weight matrix that backend attends with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from longserve.attention.recording import AttentionRecord
from longserve.attention.reference import ReferenceAttention
from longserve.viz.checks import check_indices
from longserve.viz.figures import grid_figure, label_tokens, save_figure
from longserve.viz.prefill import load_capture_model, prefill, token_labels, tokenize

DEFAULT_HEADS = 4  # heads drawn when none are chosen: the first few


@dataclass(frozen=True)
class AttentionCapture:
    """The attention of one prompt: ``weights[i, j]`` is layer ``layers[i]``, head ``heads[j]``."""

    token_ids: list[int]  # the prompt as the model saw it
    tokens: list[str]  # one label per token
    layers: list[int]
    heads: list[int]
    weights: torch.Tensor  # [layers, heads, queries, keys] float32; row q sums to 1 over keys 0..q
    records: dict[int, AttentionRecord]  # layer -> the backend's record (q, k and weights of every head)


def capture_attention(
    prompt: str,
    model: str | None = None,
    layers: Sequence[int] = (0,),
    heads: Sequence[int] | None = None,  # None: the first DEFAULT_HEADS heads
) -> AttentionCapture:
    """Run ``prompt`` once through ``model`` (None: the default GGUF) and keep the chosen attention maps."""
    records: dict[int, list[AttentionRecord]] = {}

    def backends(num_layers: int) -> list[ReferenceAttention]:
        for layer in check_indices("layer", layers, num_layers):
            records[layer] = []
        return [ReferenceAttention(records[i].append if i in records else None) for i in range(num_layers)]

    loaded = load_capture_model(model, backends)
    num_heads = loaded.config.num_heads
    heads = check_indices("head", range(min(DEFAULT_HEADS, num_heads)) if heads is None else heads, num_heads)
    token_ids = tokenize(loaded, prompt)
    prefill(loaded, token_ids)
    layers = list(layers)
    chosen = {layer: records[layer][0] for layer in layers}  # one prefill span: one record per layer
    weights = torch.stack([chosen[layer].weights[heads].float() for layer in layers])
    return AttentionCapture(
        token_ids, token_labels(loaded.tokenizer, token_ids), layers, heads, weights, chosen
    )


def plot_attention(capture: AttentionCapture, path: str | None = None) -> Figure:
    """A grid of heatmaps, one row per layer and one column per head (query down, key across); masked
    (future) keys are left blank. Saved to ``path`` (.png or .svg) when given."""
    rows, cols = len(capture.layers), len(capture.heads)
    figure, axes = grid_figure(rows, cols)
    # A square-root colour scale: most weights are small next to the first token's (the attention sink).
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    n = len(capture.tokens)
    future = np.triu(np.ones((n, n), dtype=bool), k=1)  # [queries, keys]
    image = None
    for i, layer in enumerate(capture.layers):
        for j, head in enumerate(capture.heads):
            ax = axes[i, j]
            data = np.ma.masked_array(capture.weights[i, j].numpy(), mask=future)
            image = ax.imshow(data, cmap="viridis", norm=norm, interpolation="nearest", aspect="auto")
            ax.set_title(f"layer {layer} · head {head}", fontsize=10)
            label_tokens(ax, capture.tokens, "x")
            label_tokens(ax, capture.tokens, "y")
    figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    figure.suptitle("attention weights (query ↓, key →)")
    if path is not None:
        save_figure(figure, path)
    return figure
