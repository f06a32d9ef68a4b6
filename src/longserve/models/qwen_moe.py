"""Qwen2-MoE (Qwen1.5/2-MoE) and Qwen3-MoE: Qwen decoders with softmax top-k MoE blocks.

Qwen2-MoE: q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate(x)). Qwen3-MoE: q/k RMSNorm, no
shared expert. Both: ``norm_topk_prob`` from the config, and ``decoder_sparse_step`` / ``mlp_only_layers`` may
leave some layers with a dense MLP of ``intermediate_size``.
"""

from __future__ import annotations

from longserve.models.config import DecoderConfig
from longserve.models.moe_decoder import MoEDecoderConfig, MoEForCausalLM, moe_config_from_hf

# transformers 5 writes Qwen3-MoE's expert count as num_local_experts; hub checkpoints say num_experts.
_NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts")


def read_qwen2_moe_config(config: dict) -> MoEDecoderConfig:
    # Older config files carry no qkv_bias field: Qwen2-MoE always had the biases.
    base = DecoderConfig.from_hf(config, qkv_bias=bool(config.get("qkv_bias", True)))
    return moe_config_from_hf(
        config,
        base,
        num_experts_keys=_NUM_EXPERTS_KEYS,
        moe_intermediate_key="moe_intermediate_size",
        norm_topk_prob=None,
        shared_expert=True,
        sparse_layer_keys=True,
    )


def read_qwen3_moe_config(config: dict) -> MoEDecoderConfig:
    return moe_config_from_hf(
        config,
        DecoderConfig.from_hf(config, qk_norm=True),
        num_experts_keys=_NUM_EXPERTS_KEYS,
        moe_intermediate_key="moe_intermediate_size",
        norm_topk_prob=None,
        sparse_layer_keys=True,
    )


class QwenMoeForCausalLM(MoEForCausalLM):
    """Checkpoint names: model.layers.{i}.mlp.gate.weight, mlp.experts.{e}.gate_proj|up_proj|down_proj.weight,
    mlp.shared_expert.*.weight, mlp.shared_expert_gate.weight: MoEWeightNames' defaults."""
