"""MoE routing charts: tokens per expert in every MoE layer (load) and each token's experts in one layer.

Every MoE block of the model gets a recording hook for one prefill of the prompt, so the charts show the
router's own choices (``route`` in layers/moe_router.py). Shared experts take every token and are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from longserve.attention.reference import ReferenceAttention
from longserve.layers.moe import MoE
from longserve.layers.moe_router import RoutingRecord
from longserve.viz.checks import VizError
from longserve.viz.figures import grid_figure, label_tokens, save_figure
from longserve.viz.prefill import load_capture_model, prefill, token_labels, tokenize

MAX_ANNOTATED_EXPERTS = 16  # the load heatmap writes each count in its cell up to this many experts


@dataclass(frozen=True)
class MoeCapture:
    """The routing of one prompt: ``records[layer]`` for every MoE layer, ``layer`` the one mapped."""

    token_ids: list[int]  # the prompt as the model saw it
    tokens: list[str]  # one label per token
    num_experts: int  # routed experts per MoE layer
    top_k: int
    records: dict[int, RoutingRecord]  # MoE layer index -> its router's choices (ids, weights [tokens, k])
    layer: int  # the layer of the routing map

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.records)

    def counts(self) -> torch.Tensor:
        """[MoE layers, experts] int64: how many tokens each expert received, per layer (``moe_layers`` order);
        each row sums to tokens x top_k."""
        return torch.stack(
            [
                torch.bincount(self.records[i].ids.reshape(-1), minlength=self.num_experts)
                for i in self.moe_layers
            ]
        )

    def routing_map(self, layer: int | None = None) -> torch.Tensor:
        """[tokens, experts] float32: each token's routing weight for its chosen experts, 0 elsewhere."""
        record = self.records[self.layer if layer is None else layer]
        out = torch.zeros(record.ids.shape[0], self.num_experts)
        return out.scatter_(1, record.ids, record.weights.float())


def capture_moe_routing(prompt: str, model: str, layer: int | None = None) -> MoeCapture:
    """Run ``prompt`` once through ``model`` and keep every MoE layer's routing; ``layer`` (default: the first
    MoE layer) is the one whose per-token map is drawn."""
    loaded = load_capture_model(model, lambda num_layers: [ReferenceAttention()] * num_layers)
    blocks = {i: block.mlp for i, block in enumerate(loaded.model.layers) if isinstance(block.mlp, MoE)}
    if not blocks:
        raise VizError(f"{loaded.path}: the model has no MoE layers")
    if layer is None:
        layer = min(blocks)
    elif layer not in blocks:
        raise VizError(f"layer {layer} is not an MoE layer; the MoE layers are {sorted(blocks)}")
    recorded: dict[int, list[RoutingRecord]] = {i: [] for i in blocks}
    for i, moe in blocks.items():
        moe.record = recorded[i].append
    token_ids = tokenize(loaded, prompt)
    prefill(loaded, token_ids)
    router = blocks[layer].router
    return MoeCapture(
        token_ids,
        token_labels(loaded.tokenizer, token_ids),
        router.num_experts,
        router.top_k,
        {i: records[0] for i, records in recorded.items()},  # one forward: one record per block
        layer,
    )


def plot_moe_routing(capture: MoeCapture, path: str | None = None) -> Figure:
    """Expert load (MoE layers x experts, left) and the routing map of ``capture.layer`` (tokens x experts,
    right). Saved to ``path`` (.png or .svg) when given."""
    figure, axes = grid_figure(1, 2)
    load_ax, map_ax = axes[0]
    counts = capture.counts().numpy()
    image = load_ax.imshow(counts, cmap="YlOrRd", aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=load_ax, shrink=0.8, label="tokens")
    layers = capture.moe_layers
    load_ax.set_yticks(np.arange(len(layers)), [str(i) for i in layers])
    load_ax.set_xlabel("expert")
    load_ax.set_ylabel("layer")
    load_ax.set_title(f"expert load ({len(capture.tokens)} tokens, top-{capture.top_k})", fontsize=10)
    if capture.num_experts <= MAX_ANNOTATED_EXPERTS:
        for (row, col), count in np.ndenumerate(counts):
            load_ax.text(col, row, str(count), ha="center", va="center", fontsize=7)
    weights = np.ma.masked_equal(capture.routing_map().numpy(), 0.0)  # unchosen experts stay blank
    image = map_ax.imshow(weights, cmap="viridis", aspect="auto", interpolation="nearest", vmin=0.0)
    figure.colorbar(image, ax=map_ax, shrink=0.8, label="routing weight")
    label_tokens(map_ax, capture.tokens, "y")
    map_ax.set_xlabel("expert")
    map_ax.set_title(f"layer {capture.layer}: each token's experts", fontsize=10)
    if path is not None:
        save_figure(figure, path)
    return figure
