"""How a family's checkpoint names one MoE block's tensors, and the loader of each name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from longserve.layers.moe import EXPERT_PARTS, MoE


@dataclass(frozen=True)
class MoEWeightNames:
    """How a family's checkpoint names one MoE block's tensors, relative to the block's prefix."""

    gate: str = "gate.weight"
    correction_bias: str = "gate.e_score_correction_bias"
    expert: str = "experts.{index}.{part}.weight"
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    shared: str = "shared_expert.{part}.weight"  # DeepSeek: "shared_experts.{part}.weight"
    shared_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_gate: str = "shared_expert_gate.weight"


def moe_weight_targets(
    moe: MoE, prefix: str, names: MoEWeightNames = MoEWeightNames()
) -> dict[str, Callable[[torch.Tensor], None]]:
    """Checkpoint tensor name -> loader, for the block at ``prefix`` (e.g. ``model.layers.3.mlp.``)."""
    targets: dict[str, Callable[[torch.Tensor], None]] = {prefix + names.gate: moe.load_gate}
    if moe.e_score_correction_bias is not None:
        targets[prefix + names.correction_bias] = moe.load_correction_bias
    for index in range(moe.router.num_experts):
        for part, hf_part in zip(EXPERT_PARTS, names.expert_parts, strict=True):
            name = prefix + names.expert.format(index=index, part=hf_part)
            targets[name] = partial(moe.load_expert_weight, index, part)
    if moe.shared_experts is not None:
        for part, hf_part in zip(EXPERT_PARTS, names.shared_parts, strict=True):
            targets[prefix + names.shared.format(part=hf_part)] = moe.shared_target(part)
    if moe.shared_expert_gate is not None:
        targets[prefix + names.shared_gate] = moe.load_shared_gate
    return targets
