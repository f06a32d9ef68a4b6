"""Mixtral: the Mistral decoder with a top-2-of-8 softmax MoE (renormalised) in every layer."""

from __future__ import annotations

from longserve.layers.moe_weights import MoEWeightNames
from longserve.models.config import DecoderConfig
from longserve.models.moe_decoder import MoEDecoderConfig, MoEForCausalLM, moe_config_from_hf


def read_mixtral_config(config: dict) -> MoEDecoderConfig:
    # Mixtral's experts are as wide as its intermediate_size; it has no dense layers and always renormalises.
    return moe_config_from_hf(
        config,
        DecoderConfig.from_hf(config),
        num_experts_keys=("num_local_experts",),
        moe_intermediate_key="intermediate_size",
        norm_topk_prob=True,
    )


class MixtralForCausalLM(MoEForCausalLM):
    # Checkpoint names: model.layers.{i}.block_sparse_moe.gate.weight, ....experts.{e}.w1|w3|w2.weight
    moe_block = "block_sparse_moe"
    moe_names = MoEWeightNames(expert_parts=("w1", "w3", "w2"))
