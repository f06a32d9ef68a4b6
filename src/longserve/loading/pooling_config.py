"""PoolingConfig: how a checkpoint turns hidden states into one embedding, read from its sentence-transformers files
(and the Matryoshka truncation of an embedding for a request's ``dimensions``, torch-free for the worker).

A sentence-transformers checkpoint lists its pipeline in ``modules.json``: a Transformer (the model itself), then
a Pooling module (its ``config.json`` says cls / mean / last-token), then optionally Normalize (L2). Both the
legacy form (``pooling_mode_cls_token: true`` and its siblings, as the hub's checkpoints ship) and the
sentence-transformers >= 5 form (``pooling_mode: "lasttoken"``) are read. A pipeline with steps we do not run
(a Dense projection, max pooling, several modes concatenated) raises ``ModelLoadError`` rather than serving
vectors that differ from the checkpoint's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Literal

from longserve.loading.errors import ModelLoadError

Pooling = Literal["cls", "mean", "last"]

MODULES_FILE = "modules.json"

# sentence-transformers' mode names -> ours.
_MODES: dict[str, Pooling] = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
# Legacy boolean keys of a Pooling config.json, by the mode each switches on.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Pipeline steps that do not change the vector (dropout is off at inference).
_PASS_THROUGH = frozenset({"Transformer", "Dropout"})


@dataclass(frozen=True)
class PoolingConfig:
    """One embedding per input: which hidden states to pool, and whether the result is L2-normalised."""

    pooling: Pooling  # "cls": the first token's; "mean": the average over tokens; "last": the last token's
    normalize: bool  # L2-normalise the pooled vector


# What a chat model's embedding is when the checkpoint says nothing: the mean of its final-norm hidden states.
MEAN_NORMALIZED = PoolingConfig("mean", True)


def read_pooling_config(path: str) -> PoolingConfig | None:
    """The pooling a sentence-transformers checkpoint directory declares; None when it has no ``modules.json``.

    Raises ``ModelLoadError`` naming the file for a malformed or unsupported pipeline.
    """
    modules_file = os.path.join(path, MODULES_FILE)
    if not os.path.isfile(modules_file):
        return None
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{modules_file}: expected a list of module objects")
    pooling: Pooling | None = None
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]  # e.g. sentence_transformers.models.Pooling
        if kind in _PASS_THROUGH:
            continue
        if kind == "Pooling":
            if pooling is not None:
                raise ModelLoadError(f"{modules_file}: more than one Pooling module")
            config_file = os.path.join(path, str(module.get("path", "")), "config.json")
            pooling = _pooling_mode(config_file)
        elif kind == "Normalize":
            if pooling is None:
                raise ModelLoadError(f"{modules_file}: Normalize comes before any Pooling module")
            normalize = True
        else:
            raise ModelLoadError(
                f"{modules_file}: module {module.get('type')!r} is not supported "
                "(longserve runs Transformer -> Pooling -> optional Normalize)"
            )
    if pooling is None:
        raise ModelLoadError(f"{modules_file}: no Pooling module")
    return PoolingConfig(pooling, normalize)


def _pooling_mode(config_file: str) -> Pooling:
    """The single pooling mode a Pooling module's config.json switches on."""
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_KEYS.items() if config.get(key)]
        mode = modes if modes else "mean"  # sentence-transformers' own default
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str):
        raise ModelLoadError(f"{config_file}: several pooling modes at once ({mode}) are not supported")
    if mode not in _MODES:
        raise ModelLoadError(
            f"{config_file}: pooling mode {mode!r} is not supported (supported: {', '.join(_MODES)})"
        )
    return _MODES[mode]


def _read_json(file: str) -> object:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file}: cannot be read as JSON: {e}") from e


def truncate_embedding(vector: list[float], dimensions: int, normalize: bool) -> list[float]:
    """The first ``dimensions`` components (Matryoshka-style), L2-normalised again if the model normalises:
    what a model trained with Matryoshka loss means by a shorter embedding."""
    if not 1 <= dimensions <= len(vector):
        raise ValueError(f"dimensions must be between 1 and {len(vector)}, got {dimensions}")
    head = vector[:dimensions]
    if not normalize:
        return head
    norm = math.sqrt(math.fsum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head
