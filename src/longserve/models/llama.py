"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): pre-norm blocks of GQA self-attention and SwiGLU; as a
causal LM, or headless as a decoder embedder (Qwen3-Embedding's ``Qwen3Model``).

Under tensor parallelism (``tp``) a model holds one rank's shard: its query and KV heads, its MLP rows and its
vocabulary rows. Attention and feed-forward blocks then return partial sums, which the shared decoder layer
all-reduces (one all-reduce each); the checkpoint's full tensors are sliced as they are loaded."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.distributed.parallel import TensorParallel
from longserve.layers.attention import SelfAttention
from longserve.layers.cpu_decoder_layer import CpuDecodeLayer
from longserve.layers.linear import Linear
from longserve.layers.matmul import PreparedMatmul, runs_blocks
from longserve.layers.mlp import SwiGLUMLP
from longserve.layers.norm import RMSNorm
from longserve.layers.rotary import RotaryEmbedding
from longserve.layers.weight_loading import Loader, copier, load_into
from longserve.models.config import DecoderConfig


class PreNormDecoderLayer(nn.Module):
    """The block every family shares: norm -> attention -> residual add -> norm -> feed-forward.

    The residual stream travels beside the hidden states, so each add is fused with the norm that follows it
    (one kernel on CUDA); the result equals ``h + attn(norm(h))`` then ``h + mlp(norm(h))``. Subclasses
    build ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``.
    """

    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    self_attn: nn.Module
    mlp: nn.Module
    tp: TensorParallel  # a shard's blocks give partial sums: reduced here (identity on one device)
    cpu_step: CpuDecodeLayer | None = None  # the whole layer as one compiled call for CPU decode steps

    def forward(
        self,
        hidden: torch.Tensor,  # [tokens, hidden]: the previous block's output, not yet added
        residual: torch.Tensor | None,  # [tokens, hidden]; None for the first layer
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cpu_step is not None and self.cpu_step.runs(cache, metadata):
            return self.cpu_step(hidden, residual, rope, cache, metadata)
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward(hidden, residual)
        hidden = self.tp.all_reduce(self.self_attn(hidden, rope, cache, metadata))
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.tp.all_reduce(self.mlp(hidden)), residual


def run_decoder(
    layers: nn.ModuleList,
    final_norm: RMSNorm,
    hidden: torch.Tensor,  # [tokens, hidden] embeddings
    rope: tuple[torch.Tensor, torch.Tensor],
    caches: list[LayerKVCache],
    metadata: AttentionMetadata,
) -> torch.Tensor:
    """Every layer, then the final norm over the last residual add: [tokens, hidden]."""
    residual = None
    for layer, cache in zip(layers, caches, strict=True):
        hidden, residual = layer(hidden, residual, rope, cache, metadata)
    if residual is None:  # no layers
        return final_norm(hidden)
    return final_norm.add_forward(hidden, residual)[0]


class DecoderLayer(PreNormDecoderLayer):
    def __init__(
        self,
        config: DecoderConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        mlp: nn.Module | None = None,  # the feed-forward block (e.g. an MoE block); None: SwiGLU
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp = tp or TensorParallel()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(
            config.hidden_size,
            tp.local(config.num_heads, "num_attention_heads"),
            tp.local_kv_heads(config.num_kv_heads),
            config.head_dim,
            qkv_bias=config.qkv_bias,
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
            backend=backend,
            dtype=dtype,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if mlp is None:
            mlp = SwiGLUMLP(
                config.hidden_size, tp.local(config.intermediate_size, "intermediate_size"), dtype
            )
        self.mlp = mlp


class LlamaForCausalLM(nn.Module):
    """Token ids -> last hidden states -> logits. Every step's tokens arrive flattened: [tokens].

    ``backends`` holds one attention backend per layer (MoBA keeps some layers dense).
    """

    # The decode forward has static shapes and no host syncs: engine/cuda_graphs.py may capture it.
    supports_cuda_graphs: ClassVar[bool] = True
    weight_prefix: ClassVar[str] = "model."  # before every tensor name but the output head's
    has_output_head: ClassVar[bool] = True  # False: hidden states only (an embedder); compute_logits raises

    def __init__(
        self,
        config: DecoderConfig,
        backends: Sequence[AttentionBackend],
        dtype: torch.dtype,
        tp: TensorParallel | None = None,  # this rank's place; None: the whole model on one device
    ) -> None:
        super().__init__()
        if len(backends) != config.num_layers:
            raise ValueError(f"got {len(backends)} attention backends for {config.num_layers} layers")
        self.config = config
        self.dtype = dtype
        self.tp = tp = tp or TensorParallel()
        vocab_rows = tp.local_vocab(config.vocab_size)
        # A bare parameter rather than nn.Embedding, whose random init would touch (and so commit) its memory.
        self.embed_tokens = nn.Parameter(
            torch.empty(vocab_rows, config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, backends[i], dtype, self._build_mlp(i), tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.head_blocks = None  # the output head's low-bit blocks, between load_weights and prepare
        self.embed_blocks = None  # the embedding's low-bit blocks when it is served from them
        self.lm_head = (
            None
            if config.tie_word_embeddings or not self.has_output_head
            else nn.Parameter(torch.empty(vocab_rows, config.hidden_size, dtype=dtype), requires_grad=False)
        )

    def _build_mlp(self, layer_index: int) -> nn.Module:
        """Layer ``layer_index``'s feed-forward block (this rank's rows); families with other blocks (MoE)
        override this."""
        inter = self.tp.local(self.config.intermediate_size, "intermediate_size")
        return SwiGLUMLP(self.config.hidden_size, inter, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        caches: list[LayerKVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-norm hidden states, [tokens, hidden]."""
        if self.embed_blocks is not None:
            hidden = self.embed_blocks.select_rows(input_ids).dequantize().to(self.dtype)  # [tokens, hidden]
        else:
            hidden = self.tp.embedding(input_ids, self.embed_tokens, self.config.vocab_size)
        rope = self.rotary.lookup(positions, hidden.dtype)
        return run_decoder(self.layers, self.norm, hidden, rope, caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> float32 logits [rows, vocab]."""
        if not self.has_output_head:
            raise ValueError(f"{self.config.architecture} has no output head: it embeds and cannot generate")
        if self.lm_head_kernel is not None:
            local = self.lm_head_kernel(hidden)
        else:
            local = F.linear(hidden, self.embed_tokens if self.config.tie_word_embeddings else self.lm_head)
        return self.tp.gather_logits(
            local.float(), self.config.vocab_size
        )  # this rank's vocab rows, then all

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Once weights are loaded: repack every projection, the output head included, for the fast kernels
        (``quantization="int8"``: dynamic int8, see layers/matmul.py)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare(quantization)
        if runs_blocks(quantization) and self.embed_tokens.device.type == "cpu":
            # The fast CPU mode also runs the small per-layer ops (norms, rotary, SiLU·mul) and decode
            # attention as compiled calls.
            from longserve.layers.cpu_kernels import cpu_kernels

            kernels = cpu_kernels()
            for module in self.modules():
                if isinstance(module, (RMSNorm, SwiGLUMLP, SelfAttention)):
                    module.use_cpu_kernels(kernels)
            for layer in self.layers:
                if isinstance(layer, PreNormDecoderLayer):
                    layer.cpu_step = CpuDecodeLayer.build(layer, kernels)
        if not self.has_output_head:
            self.lm_head_kernel, self.head_blocks = None, None
            return
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        head_blocks = self.head_blocks if runs_blocks(quantization) else None
        # With int8 the head serves decode steps; the rare larger step (prompt logprobs) can use the plain
        # weight, which for tied embeddings costs no memory, instead of a second fp32 copy.
        self.lm_head_kernel = PreparedMatmul(
            None if head_blocks is not None else head.data,
            quantization=quantization,
            repack=quantization != "int8",
            blocks=head_blocks,
        )
        if head_blocks is not None and self.embed_blocks is head_blocks:
            self.embed_blocks = self.lm_head_kernel.blocks  # tied: lookups read the head's tiles, one copy
        self.head_blocks = None
        if not self.config.tie_word_embeddings and self.lm_head_kernel.weight is None:
            self.lm_head = None  # repacked: the plain copy would only take memory

    def load_weights(self, weights: Mapping[str, torch.Tensor], keep_blocks: bool = False) -> None:
        """Copy HF-named tensors into the fused parameters; unknown or missing names raise ``ValueError``.

        Each name is read once, so a lazily dequantized checkpoint never sits in memory whole. With
        ``keep_blocks``, projections the file stores in a low-bit block format (GGUF Q4_0/Q4_1/Q8_0; see
        ``weights.blocks``) are kept as those blocks and never expanded, the output head's included.
        """
        blocks_of = getattr(weights, "blocks", None) if keep_blocks else None
        embed_name = self.weight_prefix + "embed_tokens.weight"
        tied = self.config.tie_word_embeddings
        head_name = embed_name if tied else "lm_head.weight"
        with_head = self.has_output_head and blocks_of is not None and head_name in weights
        self.head_blocks = blocks_of(head_name) if with_head else None
        # Embedding rows are looked up from the blocks too: the float table would be the largest tensor.
        if blocks_of is None or embed_name not in weights:
            self.embed_blocks = None
        else:
            self.embed_blocks = self.head_blocks if tied and with_head else blocks_of(embed_name)
        skip = set()
        if self.head_blocks is not None:
            skip.add(head_name)
        if self.embed_blocks is not None:
            skip.add(embed_name)  # served from its blocks; the float copy would only take memory
        load_into(weights, self.weight_targets(), self.dtype, _ignorable, blocks_of, skip)

    def weight_targets(self) -> dict[str, Loader]:
        """HF tensor name -> function copying that tensor into place."""
        top, tp = self.weight_prefix, self.tp
        kv_rows = partial(tp.kv_head_rows, num_kv_heads=self.config.num_kv_heads)
        targets = {
            top + "embed_tokens.weight": sliced(tp, copier(self.embed_tokens), tp.vocab_rows),
            top + "norm.weight": copier(self.norm.weight),
        }
        if self.has_output_head and not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = sliced(tp, copier(self.lm_head), tp.vocab_rows)
        for i, layer in enumerate(self.layers):
            prefix = f"{top}layers.{i}."
            attn = layer.self_attn
            targets[prefix + "input_layernorm.weight"] = copier(layer.input_layernorm.weight)
            targets[prefix + "post_attention_layernorm.weight"] = copier(
                layer.post_attention_layernorm.weight
            )
            for shard, (part, rows) in enumerate((("q", tp.rows), ("k", kv_rows), ("v", kv_rows))):
                targets[f"{prefix}self_attn.{part}_proj.weight"] = sliced(
                    tp, attn.qkv_proj.shard(shard), rows
                )
                if attn.qkv_proj.bias is not None:
                    load_bias = partial(attn.qkv_proj.load_bias_shard, shard)
                    targets[f"{prefix}self_attn.{part}_proj.bias"] = sliced(tp, load_bias, rows)
            targets[prefix + "self_attn.o_proj.weight"] = sliced(tp, attn.o_proj.shard(0), input_columns(tp))
            if attn.q_norm is not None:
                targets[prefix + "self_attn.q_norm.weight"] = copier(attn.q_norm.weight)
                targets[prefix + "self_attn.k_norm.weight"] = copier(attn.k_norm.weight)
            targets.update(self._mlp_weight_targets(prefix, layer.mlp))
        return targets

    def _mlp_weight_targets(self, layer_prefix: str, mlp: nn.Module) -> dict[str, Loader]:
        """The feed-forward block's tensors (``layer_prefix`` is ``model.layers.{i}.``); families override."""
        return swiglu_weight_targets(self.tp, mlp, layer_prefix + "mlp.")


def swiglu_weight_targets(
    tp: TensorParallel, mlp: SwiGLUMLP, prefix: str, names: tuple[str, str, str] = ("gate", "up", "down")
) -> dict[str, Loader]:
    """A SwiGLU block's three projections under ``prefix``: gate and up column-parallel, down row-parallel."""
    gate, up, down = (f"{prefix}{name}_proj.weight" for name in names)
    return {
        gate: sliced(tp, mlp.gate_up_proj.shard(0), tp.rows),
        up: sliced(tp, mlp.gate_up_proj.shard(1), tp.rows),
        down: sliced(tp, mlp.down_proj.shard(0), input_columns(tp)),
    }


def sliced(tp: TensorParallel, load: Callable, take: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``load`` fed this rank's part (``take``) of each full checkpoint tensor; ``load`` itself on one device
    (so a ``ShardTarget`` keeps taking low-bit blocks)."""
    if not tp.is_parallel:
        return load
    return lambda tensor: load(take(tensor))


def input_columns(tp: TensorParallel) -> Callable[[torch.Tensor], torch.Tensor]:
    """A row-parallel projection's slice: this rank's input columns."""
    return partial(tp.rows, dim=1)


class LlamaEmbeddingModel(LlamaForCausalLM):
    """The decoder as HF's bare ``*Model`` saves it (Qwen3-Embedding is a ``Qwen3Model``): tensor names without
    ``model.``, no output head. It gives final-norm hidden states for pooling and cannot generate."""

    weight_prefix: ClassVar[str] = ""
    has_output_head: ClassVar[bool] = False


def _ignorable(name: str) -> bool:
    # Precomputed rotary tables some exporters save, and a tied lm_head duplicated on disk.
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"
