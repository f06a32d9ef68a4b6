"""DeepSeek-V2/V3 decoders (also Moonlight, Kimi K2): Multi-head Latent Attention and DeepSeekMoE blocks.

Layer i is ``x + MLA(norm(x))`` then ``+ FFN(norm(x))``, where FFN is a dense SwiGLU for the first
``first_k_dense_replace`` layers and DeepSeekMoE (shared experts + fine-grained routed experts) after them.
This file maps config.json and checkpoint names; the layers are layers/mla.py and layers/moe.py.

Routing follows transformers, our oracle. V2: softmax over all experts, top-k (``greedy``) or top-k within the
``topk_group`` best of ``n_group`` groups, each scored by its best expert (``group_limited_greedy``); weights
times ``routed_scaling_factor``, never renormalised. V3: sigmoid scores; ``e_score_correction_bias`` is added
for choosing groups (sum of each group's two best) and experts only; the chosen experts' plain scores are
optionally renormalised (``norm_topk_prob``), then scaled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.attention.paged_decode import decode_kernel_takes
from longserve.distributed.parallel import TensorParallel
from longserve.layers.linear import Linear
from longserve.layers.matmul import PreparedMatmul
from longserve.layers.mla import MLAConfig, MLARotary, MultiHeadLatentAttention, mla_softmax_scale
from longserve.layers.mlp import SwiGLUMLP
from longserve.layers.moe import MoE, RouterConfig, moe_blocks_capturable
from longserve.layers.moe_weights import MoEWeightNames, moe_weight_targets
from longserve.layers.norm import RMSNorm
from longserve.layers.weight_loading import Loader, copier, load_into
from longserve.models.llama import PreNormDecoderLayer, run_decoder, sliced, swiglu_weight_targets

# transformers' config-class defaults, used where config.json omits a field (as HF itself does).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "DeepseekV2ForCausalLM": dict(
        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=None, moe_intermediate_size=1407, routed_scaling_factor=1.0, n_group=None, topk_group=None,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, max_position_embeddings=2048,
    ),
    "DeepseekV3ForCausalLM": dict(
        first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=8, topk_group=4,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, max_position_embeddings=4096,
    ),
}  # fmt: skip
# What each architecture's HF implementation computes, whatever the config says.
_SCORING = {"DeepseekV2ForCausalLM": ("softmax",), "DeepseekV3ForCausalLM": ("sigmoid",)}
_TOPK_METHODS = {
    "DeepseekV2ForCausalLM": ("greedy", "group_limited_greedy"),
    "DeepseekV3ForCausalLM": ("noaux_tc",),
}


@dataclass(frozen=True)
class DeepseekConfig:
    """The typed subset of a DeepSeek-V2/V3 config.json. ``num_kv_heads`` and ``head_dim`` describe what the
    engine's paged cache stores per token and layer: every head's expanded key and value (layers/mla.py)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP width
    num_layers: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    mla: MLAConfig
    first_k_dense_replace: int
    moe_intermediate_size: int
    n_shared_experts: int  # shared experts run as one SwiGLU of n_shared_experts * moe_intermediate_size
    router: RouterConfig

    @property
    def num_heads(self) -> int:
        return self.mla.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.mla.num_heads

    @property
    def head_dim(self) -> int:
        return self.mla.cache_head_dim

    @classmethod
    def from_hf(cls, config: dict) -> DeepseekConfig:
        """Read a HF config dict; a missing, unknown or inconsistent field raises ``ValueError`` naming it."""
        arch = config["architectures"][0]
        defaults = _HF_DEFAULTS[arch]

        def get(key: str) -> Any:
            return config[key] if key in config else defaults.get(key)

        def positive(key: str, minimum: int = 1) -> int:
            value = get(key)
            if value is None:
                raise ValueError(f"config.json: missing required field {key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
            return value

        for key, allowed in (("scoring_func", _SCORING[arch]), ("topk_method", _TOPK_METHODS[arch])):
            if get(key) not in allowed:
                raise ValueError(
                    f"config.json: {key} must be one of {list(allowed)} for {arch}, got {get(key)!r}"
                )
        if get("hidden_act") not in (None, "silu"):
            raise ValueError(f"config.json: hidden_act {get('hidden_act')!r} is not supported (only 'silu')")
        if get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if get("moe_layer_freq") not in (None, 1):
            raise ValueError(f"config.json: moe_layer_freq must be 1, got {get('moe_layer_freq')!r}")
        if arch == "DeepseekV2ForCausalLM" and get("norm_topk_prob"):
            # transformers ignores it for V2 while DeepSeek's own code renormalises and drops the scaling.
            raise ValueError("config.json: norm_topk_prob=true is not supported for DeepseekV2ForCausalLM")

        num_experts, top_k = positive("n_routed_experts"), positive("num_experts_per_tok")
        if top_k > num_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok ({top_k}) must be at most n_routed_experts ({num_experts})"
            )
        n_group = topk_group = None
        if get("topk_method") != "greedy":  # group-limited routing
            n_group, topk_group = positive("n_group"), positive("topk_group")
            if num_experts % n_group:
                raise ValueError(
                    f"config.json: n_group ({n_group}) must divide n_routed_experts ({num_experts})"
                )
            if topk_group > n_group:
                raise ValueError(
                    f"config.json: topk_group ({topk_group}) must be at most n_group ({n_group})"
                )
        scaling_factor = get("routed_scaling_factor")
        try:
            router = RouterConfig(
                num_experts,
                top_k,
                scoring=get("scoring_func"),
                norm_topk_prob=bool(get("norm_topk_prob")),
                n_group=n_group,
                topk_group=topk_group,
                use_correction_bias=arch == "DeepseekV3ForCausalLM",
                routed_scaling_factor=float(1.0 if scaling_factor is None else scaling_factor),
                sorted_topk=False,  # as HF's DeepSeek routers: same tie-breaking and summation order
            )
        except ValueError as exc:
            raise ValueError(f"config.json: {exc}") from exc

        # transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        mla = MLAConfig(
            hidden_size=positive("hidden_size"),
            num_heads=positive("num_attention_heads"),
            q_lora_rank=get("q_lora_rank"),  # null: q straight from hidden (q_proj)
            kv_lora_rank=positive("kv_lora_rank"),
            qk_nope_head_dim=positive("qk_nope_head_dim", minimum=0),
            qk_rope_head_dim=positive("qk_rope_head_dim"),
            v_head_dim=positive("v_head_dim"),
            attention_bias=bool(get("attention_bias")),
            # V2 always pairs RoPE dims (complex numbers); V3 unless rope_interleave is false.
            rope_interleave=arch == "DeepseekV2ForCausalLM" or get("rope_interleave") is not False,
        )
        return cls(
            architecture=arch,
            vocab_size=positive("vocab_size"),
            hidden_size=mla.hidden_size,
            intermediate_size=positive("intermediate_size"),
            num_layers=positive("num_hidden_layers"),
            rms_norm_eps=float(get("rms_norm_eps") or 1e-6),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=positive("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            mla=mla,
            first_k_dense_replace=positive("first_k_dense_replace", minimum=0),
            moe_intermediate_size=positive("moe_intermediate_size"),
            n_shared_experts=positive("n_shared_experts", minimum=0) if get("n_shared_experts") else 0,
            router=router,
        )


class DeepseekDecoderLayer(PreNormDecoderLayer):
    def __init__(
        self,
        config: DeepseekConfig,
        layer_index: int,
        backend: AttentionBackend,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        scale = mla_softmax_scale(config.mla.qk_head_dim, config.rope_scaling)
        self.self_attn = MultiHeadLatentAttention(config.mla, scale, backend, dtype, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: nn.Module
        if layer_index < config.first_k_dense_replace:
            inter = tp.local(config.intermediate_size, "intermediate_size")
            self.mlp = SwiGLUMLP(config.hidden_size, inter, dtype)
        else:
            self.mlp = MoE(
                config.hidden_size,
                config.moe_intermediate_size,
                config.router,
                num_shared_experts=config.n_shared_experts,
                dtype=dtype,
                router_dtype=torch.float32,  # HF routes on float32 logits whatever the model's dtype
                tp=tp,
            )


class DeepseekForCausalLM(nn.Module):
    """Token ids -> last hidden states -> logits, for DeepseekV2ForCausalLM and DeepseekV3ForCausalLM.

    Same interface as LlamaForCausalLM: every step's tokens arrive flattened ([tokens]), one attention backend
    per layer. MLA runs on any backend, MoBA included: q, k and v share the cache's head size (layers/mla.py).
    """

    def __init__(
        self,
        config: DeepseekConfig,
        backends: Sequence[AttentionBackend],
        dtype: torch.dtype,
        tp: TensorParallel | None = None,  # this rank's place (see llama.py); None: one device
    ) -> None:
        super().__init__()
        if len(backends) != config.num_layers:
            raise ValueError(f"got {len(backends)} attention backends for {config.num_layers} layers")
        self.config, self.dtype = config, dtype
        self.tp = tp = tp or TensorParallel()
        vocab_rows = tp.local_vocab(config.vocab_size)
        # Bare parameters rather than nn.Embedding/nn.Linear, whose random init would commit their memory.
        self.embed_tokens = nn.Parameter(
            torch.empty(vocab_rows, config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i, backends[i], dtype, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = MLARotary(
            config.mla.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(torch.empty(vocab_rows, config.hidden_size, dtype=dtype), requires_grad=False)
        )
        self.lm_head_kernel: PreparedMatmul | None = None

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode steps may be captured when the paged decode kernel takes MLA's cache head size (else decode
        gathers each context, sized on the host) and every MoE block runs sync-free kernels here."""
        return decode_kernel_takes(self.config.mla.cache_head_dim) and moe_blocks_capturable(
            self, self.config.hidden_size
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        caches: list[LayerKVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-norm hidden states, [tokens, hidden]."""
        hidden = self.tp.embedding(input_ids, self.embed_tokens, self.config.vocab_size)
        rope = self.rotary.lookup(positions, hidden.dtype)  # cos, sin: [tokens, 1, qk_rope_head_dim / 2]
        return run_decoder(self.layers, self.norm, hidden, rope, caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> float32 logits [rows, vocab]."""
        if self.lm_head_kernel is not None:
            local = self.lm_head_kernel(hidden)
        else:
            local = F.linear(hidden, self.embed_tokens if self.config.tie_word_embeddings else self.lm_head)
        return self.tp.gather_logits(local.float(), self.config.vocab_size)

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Once weights are loaded: repack projections, routed experts and the output head (see llama.py)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare(quantization)  # the router's Linear ignores int8: it must route exactly
            elif isinstance(module, MoE):
                module.prepare(quantization)
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        self.lm_head_kernel = PreparedMatmul(
            head.data, quantization=quantization, repack=quantization is None
        )
        if not self.config.tie_word_embeddings and self.lm_head_kernel.weight is None:
            self.lm_head = None  # repacked: the plain copy would only take memory

    def load_weights(self, weights: Mapping[str, torch.Tensor], keep_blocks: bool = False) -> None:
        """Copy HF-named tensors into place; unknown or missing names raise ``ValueError``. (``keep_blocks``
        is accepted for one interface: DeepSeek checkpoints come from safetensors, which has no blocks.)

        Routed experts may be stored per expert (hub checkpoints, and what transformers 5 saves) or stacked
        (``experts.gate_up_proj`` / ``experts.down_proj``, transformers 5's in-memory layout). Each name is
        read once, so a lazily dequantized checkpoint never sits in memory whole.
        """
        load_into(weights, self.weight_targets(set(weights)), self.dtype, self._ignorable)

    def weight_targets(self, names: set[str] | None = None) -> dict[str, Loader]:
        """HF tensor name -> function copying that tensor into place. ``names``: the checkpoint's (it says
        how routed experts are stored; default: per expert)."""
        names = names or set()
        tp = self.tp
        targets: dict[str, Loader] = {
            "model.embed_tokens.weight": sliced(tp, copier(self.embed_tokens), tp.vocab_rows),
            "model.norm.weight": copier(self.norm.weight),
        }
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = sliced(tp, copier(self.lm_head), tp.vocab_rows)
        for i, layer in enumerate(self.layers):
            targets.update(decoder_layer_targets(tp, layer, f"model.layers.{i}.", names))
        return targets

    def _ignorable(self, name: str) -> bool:
        # Precomputed rotary tables, a tied lm_head duplicated on disk, and V3's multi-token-prediction
        # layers (model.layers.{num_layers}...), which plain next-token decoding does not run.
        if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
            return True
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return match is not None and int(match.group(1)) >= self.config.num_layers


def decoder_layer_targets(
    tp: TensorParallel, layer: DeepseekDecoderLayer, prefix: str, names: set[str]
) -> dict[str, Loader]:
    """HF tensor name -> loader for one decoder layer's tensors under ``prefix`` (``model.layers.{i}.``)."""
    targets: dict[str, Loader] = {
        prefix + "input_layernorm.weight": copier(layer.input_layernorm.weight),
        prefix + "post_attention_layernorm.weight": copier(layer.post_attention_layernorm.weight),
    }
    targets.update(layer.self_attn.weight_loaders(prefix + "self_attn."))
    mlp, mlp_prefix = layer.mlp, prefix + "mlp."
    if isinstance(mlp, SwiGLUMLP):
        targets.update(swiglu_weight_targets(tp, mlp, mlp_prefix))
        return targets
    moe_targets = moe_weight_targets(mlp, mlp_prefix, MoEWeightNames(shared="shared_experts.{part}.weight"))
    if mlp_prefix + "experts.gate_up_proj" in names:  # stacked experts
        moe_targets = {k: v for k, v in moe_targets.items() if not k.startswith(mlp_prefix + "experts.")}
        moe_targets[mlp_prefix + "experts.gate_up_proj"] = mlp.load_stacked_gate_up
        moe_targets[mlp_prefix + "experts.down_proj"] = mlp.load_stacked_down
    targets.update(moe_targets)
    return targets
