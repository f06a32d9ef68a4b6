"""Llama-style decoders whose feed-forward blocks are MoE (Mixtral, Qwen2/3-MoE): their config and model base.

Attention, norms, embeddings and the loading machinery are llama.py's; a family file only says how its
config.json reads (``moe_config_from_hf``) and what its checkpoint calls an MoE block's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from longserve.layers.moe import MoE, RouterConfig, moe_blocks_capturable
from longserve.layers.moe_weights import MoEWeightNames, moe_weight_targets
from longserve.models.config import DecoderConfig
from longserve.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class MoEDecoderConfig(DecoderConfig):
    """DecoderConfig plus the expert layout; ``intermediate_size`` stays the dense layers' MLP width."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: shared expert output scaled by sigmoid(Linear(hidden -> 1))
    moe_layers: frozenset[int] = frozenset()  # layer indices whose block is MoE; the others are dense SwiGLU

    def router(self) -> RouterConfig:
        return RouterConfig(self.num_experts, self.num_experts_per_tok, norm_topk_prob=self.norm_topk_prob)


def moe_config_from_hf(
    config: dict,
    base: DecoderConfig,
    *,
    num_experts_keys: tuple[str, ...],  # the first one present holds the expert count
    moe_intermediate_key: str,
    norm_topk_prob: bool | None,  # None: read config["norm_topk_prob"]
    shared_expert: bool = False,  # Qwen2-MoE's gated shared expert (shared_expert_intermediate_size)
    sparse_layer_keys: bool = False,  # Qwen: decoder_sparse_step / mlp_only_layers choose the MoE layers
) -> MoEDecoderConfig:
    """``base`` extended with the expert fields of a HF config; a bad one raises ``ValueError`` naming it."""
    experts_key = next((key for key in num_experts_keys if config.get(key) is not None), num_experts_keys[0])
    num_experts = _positive_int(config, experts_key)
    top_k = _positive_int(config, "num_experts_per_tok")
    if top_k > num_experts:
        raise ValueError(
            f"config.json: num_experts_per_tok ({top_k}) must be at most {experts_key} ({num_experts})"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    layers = range(base.num_layers)
    moe_layers = frozenset(layers)
    if sparse_layer_keys:
        step = _positive_int(config, "decoder_sparse_step", default=1)
        dense = config.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(not isinstance(i, int) or i not in layers for i in dense):
            raise ValueError(f"config.json: mlp_only_layers must list layers in [0, {base.num_layers})")
        moe_layers = frozenset(i for i in layers if i not in dense and (i + 1) % step == 0)
    if norm_topk_prob is None:
        norm_topk_prob = bool(config.get("norm_topk_prob", False))
    return MoEDecoderConfig(
        **{f.name: getattr(base, f.name) for f in fields(DecoderConfig)},
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=_positive_int(config, moe_intermediate_key),
        norm_topk_prob=norm_topk_prob,
        shared_expert_intermediate_size=(
            _positive_int(config, "shared_expert_intermediate_size") if shared_expert else 0
        ),
        shared_expert_gate=shared_expert,
        moe_layers=moe_layers,
    )


def _positive_int(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


class MoEForCausalLM(LlamaForCausalLM):
    """The Llama decoder with an MoE block in ``config.moe_layers``. Families name the block and its tensors."""

    config: MoEDecoderConfig
    moe_block: ClassVar[str] = "mlp"  # the MoE block's name inside a layer (Mixtral: block_sparse_moe)
    moe_names: ClassVar[MoEWeightNames] = MoEWeightNames()

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode steps may be captured when every MoE block runs sync-free kernels here (``MoE.capturable``)."""
        return moe_blocks_capturable(self, self.config.hidden_size)

    def _build_mlp(self, layer_index: int) -> nn.Module:
        config = self.config
        if layer_index not in config.moe_layers:
            return super()._build_mlp(layer_index)
        shared = config.shared_expert_intermediate_size
        return MoE(
            config.hidden_size,
            config.moe_intermediate_size,
            config.router(),
            num_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared or None,
            shared_expert_gate=config.shared_expert_gate,
            dtype=self.dtype,
            tp=self.tp,
        )

    def _mlp_weight_targets(
        self, layer_prefix: str, mlp: nn.Module
    ) -> dict[str, Callable[[torch.Tensor], None]]:
        if isinstance(mlp, MoE):
            return moe_weight_targets(mlp, f"{layer_prefix}{self.moe_block}.", self.moe_names)
        return super()._mlp_weight_targets(layer_prefix, mlp)

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        super().prepare_for_inference(quantization)  # every Linear: attention, router, shared experts, head
        for module in self.modules():
            if isinstance(module, MoE):
                module.prepare(quantization)
