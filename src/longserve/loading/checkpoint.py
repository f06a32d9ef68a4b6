"""Checkpoint: a model's HF-style config, weights (HF tensor names) and tokenizer, from GGUF or safetensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from longserve.loading.errors import ModelLoadError
from longserve.loading.model_resolution import resolve_model_path
from longserve.loading.pooling_config import PoolingConfig
from longserve.loading.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """Everything the engine needs from disk, in one shape whatever the file format.

    ``weights`` uses Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``) and HF tensor
    layouts (GGUF's Q/K row permutation already undone); tensors may be memory-mapped and of any float dtype.
    """

    config: dict  # config.json as a dict (GGUF metadata is translated into the same keys)
    weights: Mapping[str, torch.Tensor]  # read each name once: values may be materialised on access
    tokenizer: Tokenizer
    path: str
    format: Literal["gguf", "safetensors"]
    # The embedding pooling its sentence-transformers files declare; None: none declared (the family's default)
    pooling: PoolingConfig | None = None


def load_checkpoint(
    model: str | None = None, *, revision: str | None = None, show_progress: bool = False
) -> Checkpoint:
    """Load a GGUF file, a Hugging Face model directory, or a hub repo id from the local hub cache
    (``model_resolution``); ``None`` means the default model."""
    from longserve.loading.default_model import default_model_path
    from longserve.loading.gguf_loader import load_gguf
    from longserve.loading.safetensors_loader import load_safetensors_dir

    path = default_model_path() if model is None else resolve_model_path(model, revision)
    if os.path.isdir(path):
        return load_safetensors_dir(path, show_progress=show_progress)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path}: not a .gguf file or a model directory")
        return load_gguf(path, show_progress=show_progress)
    raise ModelLoadError(f"model path {path!r} does not exist")
