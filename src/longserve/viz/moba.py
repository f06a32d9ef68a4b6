"""MoBA block maps: which key blocks each query block's gating chose, per head, and the gate scores behind it.

Every layer runs the ``moba`` backend (as serving does for the layers it gates); the chosen layer's backend
carries a recording hook, so the map is drawn from the very selection the backend attended with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from longserve.attention.moba import MobaAttention
from longserve.attention.moba_params import validate_moba_params
from longserve.attention.recording import MobaRecord
from longserve.viz.checks import VizError, check_indices
from longserve.viz.figures import grid_figure, save_figure
from longserve.viz.prefill import load_capture_model, prefill, tokenize

DEFAULT_HEADS = 4  # heads drawn when none are chosen: the first few


@dataclass(frozen=True)
class MobaCapture:
    """The gating of one layer on one prompt; ``record`` holds every head, ``heads`` the ones drawn."""

    layer: int
    heads: list[int]
    record: MobaRecord

    @property
    def num_blocks(self) -> int:
        """Blocks the prompt spans, the trailing partial one included."""
        return -(-(int(self.record.positions[-1]) + 1) // self.record.chunk_size)

    def block_map(self) -> torch.Tensor:
        """[heads, query blocks, key blocks] float32: the fraction of the query block's queries attending each
        key block (chosen by gating, or their own block: always 1); NaN for later key blocks."""
        record, blocks = self.record, self.num_blocks
        selected = record.selected[:, self.heads]  # [tokens, heads, topk - 1]
        tokens, heads = selected.shape[:2]
        own = record.positions // record.chunk_size  # [tokens]
        # One spare column absorbs the -1 (no block) entries.
        attended = torch.zeros(tokens, heads, blocks + 1)
        attended.scatter_(-1, selected.masked_fill(selected < 0, blocks), 1.0)
        attended[torch.arange(tokens), :, own] = 1.0
        per_block = torch.zeros(blocks, heads, blocks).index_add_(0, own, attended[..., :blocks])
        counts = torch.bincount(own, minlength=blocks).clamp(min=1)  # [query blocks]
        fraction = (per_block / counts[:, None, None]).transpose(0, 1)  # [heads, query blocks, key blocks]
        return fraction.masked_fill(_later(blocks)[None], float("nan"))

    def block_scores(self) -> torch.Tensor:
        """[heads, query blocks, key blocks] float32: the mean gate score of the query block's queries for
        each earlier key block (the blocks gating ranks); NaN elsewhere."""
        record, blocks = self.record, self.num_blocks
        scores = record.scores[:, self.heads].float()  # [tokens, heads, complete blocks]
        own = record.positions // record.chunk_size  # [tokens]
        tokens, heads, complete = scores.shape
        padded = torch.zeros(tokens, heads, blocks)
        padded[..., :complete] = scores
        per_block = torch.zeros(blocks, heads, blocks).index_add_(0, own, padded)
        counts = torch.bincount(own, minlength=blocks).clamp(min=1)
        mean = (per_block / counts[:, None, None]).transpose(0, 1)  # [heads, query blocks, key blocks]
        return mean.masked_fill(~_earlier(blocks)[None], float("nan"))


def _later(blocks: int) -> torch.Tensor:
    """[query blocks, key blocks] True where the key block comes after the query block."""
    index = torch.arange(blocks)
    return index[None, :] > index[:, None]


def _earlier(blocks: int) -> torch.Tensor:
    index = torch.arange(blocks)
    return index[None, :] < index[:, None]


def capture_moba(
    prompt: str,
    chunk_size: int,
    topk: int,
    model: str | None = None,
    layer: int = 0,
    heads: Sequence[int] | None = None,  # None: the first DEFAULT_HEADS heads
) -> MobaCapture:
    """Run ``prompt`` once through ``model`` (None: the default GGUF) with MoBA attention in every layer and
    keep layer ``layer``'s gating."""
    try:
        validate_moba_params(chunk_size, topk)
    except ValueError as exc:
        raise VizError(str(exc)) from None
    records: list[MobaRecord] = []

    def backends(num_layers: int) -> list[MobaAttention]:
        check_indices("layer", [layer], num_layers)
        return [
            MobaAttention(chunk_size, topk, records.append if i == layer else None) for i in range(num_layers)
        ]

    loaded = load_capture_model(model, backends)
    num_heads = loaded.config.num_heads
    chosen = check_indices(
        "head", range(min(DEFAULT_HEADS, num_heads)) if heads is None else heads, num_heads
    )
    prefill(loaded, tokenize(loaded, prompt))
    return MobaCapture(layer, chosen, records[0])  # one prefill span: one record


def plot_moba_blocks(capture: MobaCapture, path: str | None = None) -> Figure:
    """One row per head: the block map (left) and the mean gate scores (right), query block down and key
    block across. Saved to ``path`` (.png or .svg) when given."""
    figure, axes = grid_figure(len(capture.heads), 2)
    chosen, scores = capture.block_map().numpy(), capture.block_scores().numpy()
    record = capture.record
    for row, head in enumerate(capture.heads):
        left, right = axes[row]
        image = left.imshow(np.ma.masked_invalid(chosen[row]), cmap="Blues", vmin=0.0, vmax=1.0)
        left.set_title(f"head {head}: blocks attended", fontsize=10)
        figure.colorbar(image, ax=left, shrink=0.8, label="fraction of queries")
        masked = np.ma.masked_invalid(scores[row])
        image = right.imshow(masked, cmap="magma")
        right.set_title(f"head {head}: mean gate score", fontsize=10)
        figure.colorbar(image, ax=right, shrink=0.8)
        for ax in (left, right):
            ax.set_xlabel("key block")
            ax.set_ylabel("query block")
    figure.suptitle(
        f"MoBA gating · layer {capture.layer} · chunk {record.chunk_size} · top-{record.topk} "
        f"· {len(record.positions)} tokens"
    )
    if path is not None:
        save_figure(figure, path)
    return figure
