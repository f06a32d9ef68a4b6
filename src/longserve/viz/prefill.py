"""One recorded prefill: load a checkpoint with chosen attention backends, run the prompt through it once.

The model is the engine's own (``build_model`` + ``load_weights``), in exact float32 on the CPU, driven over a
paged KV cache exactly as a whole-prompt prefill step drives it; the recording hooks the caller put on its
backends or MoE blocks see that one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.loading.checkpoint import load_checkpoint
from longserve.loading.tokenizer import Tokenizer
from longserve.models.config import DecoderConfig
from longserve.models.registry import build_model, resolve_architecture
from longserve.viz.checks import VizError

BLOCK_SIZE = 16  # cache block size of the prefill (any size gives the same attention)
DTYPE = torch.float32


@dataclass
class CaptureModel:
    """A checkpoint built into the engine's model, ready for ``prefill``."""

    model: nn.Module
    config: DecoderConfig  # or a family's own config with the same fields (DeepseekConfig)
    tokenizer: Tokenizer
    path: str


def load_capture_model(
    model: str | None, backends: Callable[[int], Sequence[AttentionBackend]]
) -> CaptureModel:
    """The model at ``model`` (None: the default GGUF) with ``backends(num_layers)`` as its attention."""
    checkpoint = load_checkpoint(model)
    if resolve_architecture(checkpoint.config).encoder:
        raise VizError(f"{checkpoint.path}: an encoder model; these pictures need a causal decoder")
    net, config = build_model(checkpoint.config, backends, DTYPE)
    net.load_weights(checkpoint.weights)
    net.prepare_for_inference()
    return CaptureModel(net.eval(), config, checkpoint.tokenizer, checkpoint.path)


def tokenize(loaded: CaptureModel, prompt: str) -> list[int]:
    ids = loaded.tokenizer.encode(prompt)
    if not ids:
        raise VizError("the prompt is empty")
    return ids


@torch.inference_mode()
def prefill(loaded: CaptureModel, token_ids: list[int]) -> None:
    """Run ``token_ids`` through the model as one prefill step (the hooks record; the logits are dropped)."""
    n, config = len(token_ids), loaded.config
    if n > config.max_position_embeddings:
        raise VizError(f"the prompt has {n} tokens; the model takes at most {config.max_position_embeddings}")
    num_blocks = -(-n // BLOCK_SIZE) + 1  # block 0 is the cache's pad block
    caches = allocate_kv_cache(
        config.num_layers, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim, DTYPE
    )
    metadata = build_attention_metadata([list(range(1, num_blocks))], [0], [n], BLOCK_SIZE)
    loaded.model(torch.tensor(token_ids), torch.arange(n), caches, metadata)


def token_labels(tokenizer: Tokenizer, token_ids: list[int]) -> list[str]:
    """Each token as short printable text (whitespace made visible), for axis labels."""
    labels = []
    for token_id in token_ids:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        labels.append(text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or f"<{token_id}>")
    return labels
