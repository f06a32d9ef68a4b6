"""HF architecture name -> model class and config reader; the one place new model families are registered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longserve.attention.backend import BackendsForLayers, per_layer
from longserve.distributed.parallel import TensorParallel
from longserve.loading.pooling_config import MEAN_NORMALIZED, PoolingConfig
from longserve.models.bert import BertConfig, BertModel
from longserve.models.config import DecoderConfig
from longserve.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from longserve.models.interface import CausalLM, Encoder
from longserve.models.llama import LlamaEmbeddingModel, LlamaForCausalLM
from longserve.models.mixtral import MixtralForCausalLM, read_mixtral_config
from longserve.models.qwen_moe import QwenMoeForCausalLM, read_qwen2_moe_config, read_qwen3_moe_config


@dataclass(frozen=True)
class ModelFamily:
    read_config: Callable[
        [dict], Any
    ]  # DecoderConfig or a family's own config with the same engine-facing fields
    model_class: type[CausalLM] | type[Encoder]  # built as (config, backends, dtype, tp=...)
    can_generate: bool = True  # False: an embedding checkpoint without an output head; generating is refused
    encoder: bool = False  # bidirectional: embedded by ``model.encode`` in one pass, with no paged KV cache
    # The embedding pooling when the checkpoint has no sentence-transformers files saying otherwise.
    default_pooling: PoolingConfig = MEAN_NORMALIZED


def _families() -> dict[str, ModelFamily]:
    llama = ModelFamily(DecoderConfig.from_hf, LlamaForCausalLM)
    return {
        "LlamaForCausalLM": llama,
        "MistralForCausalLM": llama,
        "Qwen2ForCausalLM": ModelFamily(lambda c: DecoderConfig.from_hf(c, qkv_bias=True), LlamaForCausalLM),
        "Qwen3ForCausalLM": ModelFamily(lambda c: DecoderConfig.from_hf(c, qk_norm=True), LlamaForCausalLM),
        # Embedding checkpoints: Qwen3-Embedding pools the last token (its appended <|endoftext|>); BERT-family
        # sentence encoders pool [CLS] or the mean, as their sentence-transformers config says.
        "Qwen3Model": ModelFamily(
            lambda c: DecoderConfig.from_hf(c, qk_norm=True),
            LlamaEmbeddingModel,
            can_generate=False,
            default_pooling=PoolingConfig("last", True),
        ),
        "BertModel": ModelFamily(
            BertConfig.from_hf,
            BertModel,
            can_generate=False,
            encoder=True,
            default_pooling=PoolingConfig("cls", True),
        ),
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
    hf_config: dict, backends: BackendsForLayers, dtype: torch.dtype, tp: TensorParallel | None = None
) -> tuple[CausalLM | Encoder, DecoderConfig]:
    """An empty (unloaded) model for this config: all of it, or rank ``tp.rank``'s shard. ``backends``: one
    attention backend for every layer, or a function from the layer count to one backend per layer
    (``partial(layer_backends, engine_config)``)."""
    family = resolve_architecture(hf_config)
    config = family.read_config(hf_config)
    tp = tp or TensorParallel()
    if tp.is_parallel and family.encoder:
        raise ValueError(f"{config.architecture} runs on one device: tensor parallelism is for decoders")
    return family.model_class(config, per_layer(backends, config.num_layers), dtype, tp=tp), config
