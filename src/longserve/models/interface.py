"""What the engine calls on a model: the typed interface every family's class keeps.

The engine builds a family's class (``registry``), loads it (``load_weights``, through the one loop in
``layers/weight_loading``), prepares it for its kernels and then runs it: decoders step by step over the paged
KV cache (``CausalLM``), encoders in one bidirectional pass per input (``Encoder``). ``weight_targets`` is
also how LoRA finds a model's projections (``lora/``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.layers.weight_loading import Loader


@runtime_checkable
class ServedModel(Protocol):
    """Loading and preparing, shared by decoders and encoders (the rest is ``nn.Module``'s)."""

    config: Any  # DecoderConfig or a family's own config with the same engine-facing fields
    dtype: torch.dtype

    def weight_targets(self) -> Mapping[str, Loader]:
        """HF tensor name -> the loader that copies it into place (a projection's is a ``ShardTarget``)."""
        ...

    def load_weights(self, weights: Mapping[str, torch.Tensor], keep_blocks: bool = False) -> None:
        """Every tensor into place; unknown or missing names raise ``ValueError``. ``keep_blocks``: keep
        projections the file stores as low-bit blocks in that form."""
        ...

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Once loaded and on its device: hand the weights to the kernels ``quantization`` selects."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> nn.Module: ...

    def eval(self) -> nn.Module: ...

    def modules(self) -> Iterator[nn.Module]: ...


@runtime_checkable
class CausalLM(ServedModel, Protocol):
    """A decoder: token ids of a step's rows -> final hidden states -> logits."""

    supports_cuda_graphs: bool  # its decode forward has static shapes and no host syncs (cuda_graphs.py)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        caches: list[LayerKVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [tokens, hidden]
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> float32 logits [rows, vocab]; ValueError for a model without an output head."""
        ...


@runtime_checkable
class Encoder(ServedModel, Protocol):
    """A bidirectional encoder: sequences back to back, embedded in one pass."""

    def encode(self, input_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """[tokens] ids of the sequences in ``seq_lens`` -> [tokens, hidden]."""
        ...
