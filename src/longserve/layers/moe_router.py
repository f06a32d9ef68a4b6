"""The MoE router: which experts each token goes to and with what weights, for every family's rule.

``RouterConfig`` holds the options (DESIGN.md's router options); ``route`` applies them to router logits with
the same operations HF's routers use, so choices among tied scores and the weights match HF bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.layers.linear import Linear

SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterConfig:
    """How a token's experts and their weights follow from its router logits (see ``route``).

    Mixtral: softmax, norm_topk_prob. Qwen2/3-MoE: softmax, norm_topk_prob from the config. DeepSeek-V2:
    softmax, sorted_topk=False, n_group/topk_group for ``group_limited_greedy``. DeepSeek-V3 (Moonlight,
    Kimi K2): sigmoid, use_correction_bias, n_group/topk_group, norm_topk_prob, routed_scaling_factor,
    sorted_topk=False.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid" (HF: scoring_func)
    norm_topk_prob: bool = False  # rescale the selected weights to sum to 1
    # Group-limited routing: experts form n_group equal groups, each token keeps its topk_group best groups and
    # picks its top_k experts among theirs. A group scores its best expert, or with use_correction_bias (as
    # DeepSeek-V3) the sum of its two best corrected scores. None: off.
    n_group: int | None = None
    topk_group: int | None = None
    # DeepSeek-V3's e_score_correction_bias: added to the scores to *select* experts; weights stay uncorrected.
    use_correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    # True (Mixtral, Qwen): softmax over all experts, then top-k. False: top-k of the raw logits, then softmax
    # over the k selected (equal up to rounding to True with norm_topk_prob). Softmax scoring only.
    softmax_before_topk: bool = True
    # torch.topk's ``sorted``: DeepSeek's HF routers ask for unsorted results, whose order (and so the order
    # in which the renormalising sum adds the weights) differs; mirrored so that weights equal HF's bit for bit.
    sorted_topk: bool = True

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (top_k) must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if not self.softmax_before_topk and self.scoring != "softmax":
            raise ValueError("softmax_before_topk=False needs scoring_func 'softmax'")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group and topk_group must be set together")
        if self.n_group is not None:
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts})")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok ({self.top_k}) exceeds the experts in topk_group={self.topk_group} "
                    f"groups of {per_group}"
                )
            if self.use_correction_bias and per_group < 2:
                raise ValueError("group scores sum each group's two best experts: n_group too large")


@dataclass(frozen=True)
class RoutingRecord:
    """What an MoE block's optional recording hook (``MoE.record``, used by longserve.viz) receives per call."""

    ids: torch.Tensor  # int64 [tokens, top_k]: each token's chosen experts
    weights: torch.Tensor  # float32 [tokens, top_k]: their weights, as ``route`` returned them


def route(
    logits: torch.Tensor,  # [tokens, experts]
    config: RouterConfig,
    correction_bias: torch.Tensor | None = None,  # [experts]; required iff config.use_correction_bias
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts and weights: (float32 weights [tokens, top_k], int64 ids [tokens, top_k]).

    Every step is the operation HF's routers perform on the same float32 values, torch.topk included, so the
    choice among tied scores and the weights are HF's exactly.
    """
    if config.use_correction_bias != (correction_bias is not None):
        raise ValueError("pass correction_bias exactly when config.use_correction_bias is set")
    if config.scoring == "sigmoid":
        scores = logits.float().sigmoid()  # [tokens, experts]
    elif config.softmax_before_topk:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = logits.float()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if config.n_group is not None:
        choice = _keep_best_groups(choice, config)
    top = torch.topk(choice, config.top_k, dim=-1, sorted=config.sorted_topk)
    ids = top.indices  # [tokens, top_k]
    # Chosen on the scores themselves, topk's values are the scores' bits: no gather launch needed.
    weights = top.values if choice is scores else scores.gather(1, ids)
    if not config.softmax_before_topk:
        weights = torch.softmax(weights, dim=-1)
    elif config.norm_topk_prob:
        # The epsilon (DeepSeek-V3's) is below float32 resolution for any softmax top-k sum, so the result is
        # also bit-equal to the plain division Mixtral and Qwen use.
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:  # x 1.0 is exact: skip the launch
        weights = weights * config.routed_scaling_factor
    return weights, ids


def _keep_best_groups(choice: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """``choice`` with the experts outside each token's ``topk_group`` best groups masked out."""
    tokens, groups = choice.shape[0], config.n_group
    grouped = choice.view(tokens, groups, -1)  # [tokens, groups, experts per group]
    if config.use_correction_bias:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [tokens, groups]
    else:
        group_scores = grouped.max(dim=-1).values
    best = torch.topk(group_scores, config.topk_group, dim=-1, sorted=False).indices  # [tokens, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [tokens, groups]
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)  # [tokens, experts]
    # Masked to what HF masks with: unsorted topk's output order depends on the masked values. Probabilities
    # (DeepSeek-V2) use 0, biased or raw scores, which may be negative, -inf.
    probabilities = config.softmax_before_topk and not config.use_correction_bias
    return choice.masked_fill(~keep, 0.0 if probabilities else float("-inf"))


class RouterLinear(Linear):
    """The router's projection. Never quantized: int8 logits could send a token to other experts."""

    def prepare(self, quantization: str | None = None) -> None:
        super().prepare(None)
