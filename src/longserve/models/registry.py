"""HF architecture name -> model class and config reader; the one place new model families are registered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longserve.attention.backend import BackendsForLayers, per_layer
from longserve.models.config import DecoderConfig
from longserve.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from longserve.models.llama import LlamaForCausalLM
from longserve.models.mixtral import MixtralForCausalLM, read_mixtral_config
from longserve.models.qwen_moe import QwenMoeForCausalLM, read_qwen2_moe_config, read_qwen3_moe_config


@dataclass(frozen=True)
class ModelFamily:
    read_config: Callable[
        [dict], Any
    ]  # DecoderConfig or a family's own config with the same engine-facing fields
    model_class: type[nn.Module]


def _families() -> dict[str, ModelFamily]:
    llama = ModelFamily(DecoderConfig.from_hf, LlamaForCausalLM)
    return {
        "LlamaForCausalLM": llama,
        "MistralForCausalLM": llama,
        "Qwen2ForCausalLM": ModelFamily(lambda c: DecoderConfig.from_hf(c, qkv_bias=True), LlamaForCausalLM),
        "Qwen3ForCausalLM": ModelFamily(lambda c: DecoderConfig.from_hf(c, qk_norm=True), LlamaForCausalLM),
        "MixtralForCausalLM": ModelFamily(read_mixtral_config, MixtralForCausalLM),
        "Qwen2MoeForCausalLM": ModelFamily(read_qwen2_moe_config, QwenMoeForCausalLM),
        "Qwen3MoeForCausalLM": ModelFamily(read_qwen3_moe_config, QwenMoeForCausalLM),
        "DeepseekV2ForCausalLM": ModelFamily(DeepseekConfig.from_hf, DeepseekForCausalLM),
        "DeepseekV3ForCausalLM": ModelFamily(DeepseekConfig.from_hf, DeepseekForCausalLM),
    }


def supported_architectures() -> list[str]:
    return sorted(_families())


def resolve_architecture(hf_config: dict) -> ModelFamily:
    """The family for ``hf_config['architectures'][0]``; an unknown one raises ``ValueError`` listing the known."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ValueError("config.json: missing 'architectures'")
    family = _families().get(architectures[0])
    if family is None:
        raise ValueError(
            f"unsupported architecture {architectures[0]!r}; supported: {', '.join(supported_architectures())}"
        )
    return family


def build_model(
    hf_config: dict, backends: BackendsForLayers, dtype: torch.dtype
) -> tuple[nn.Module, DecoderConfig]:
    """An empty (unloaded) model for this config. ``backends``: one attention backend for every layer, or a
    function from the layer count to one backend per layer (``partial(layer_backends, engine_config)``)."""
    family = resolve_architecture(hf_config)
    config = family.read_config(hf_config)
    return family.model_class(config, per_layer(backends, config.num_layers), dtype), config
