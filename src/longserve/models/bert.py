"""BERT-family encoder (HF ``BertModel``): word + absolute position + token-type embeddings, then post-LayerNorm
blocks of bidirectional self-attention and a GELU MLP. It only embeds: no output head, no KV cache.

A batch travels flattened, as in the decoders: ``[tokens]`` ids of several sequences back to back with their
lengths beside them; attention keeps each sequence to itself (attention/reference.py's bidirectional core).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.reference import bidirectional_attention
from longserve.layers.linear import Linear
from longserve.layers.matmul import runs_blocks
from longserve.layers.mlp import GeluMLP
from longserve.layers.norm import LayerNorm
from longserve.layers.weight_loading import Loader, copier, load_into


@dataclass(frozen=True)
class BertConfig:
    """The typed subset of a BERT ``config.json`` (engine-facing names as DecoderConfig's)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """Read a HF config dict; a missing or unsupported field raises ``ValueError`` naming it."""

        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        if hidden % heads:
            raise ValueError(f"config.json: hidden_size ({hidden}) must be a multiple of num_attention_heads")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"config.json: position_embedding_type {position_type!r} is not supported")
        if config.get("is_decoder"):
            raise ValueError("config.json: is_decoder BERT (causal) is not supported; BertModel encodes")
        return cls(
            architecture=config["architectures"][0],
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=need("max_position_embeddings"),
            type_vocab_size=need("type_vocab_size"),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=str(config.get("hidden_act", "gelu")),
        )


class BertLayer(nn.Module):
    """x -> LayerNorm(x + attention(x)) -> LayerNorm(h + mlp(h)): BERT's post-norm block."""

    def __init__(self, config: BertConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(hidden, [hidden, hidden, hidden], True, dtype)  # query | key | value
        self.attention_output = Linear(hidden, [hidden], True, dtype)
        self.attention_norm = LayerNorm(hidden, config.layer_norm_eps, dtype)
        self.mlp = GeluMLP(hidden, config.intermediate_size, config.hidden_act, dtype)
        self.output_norm = LayerNorm(hidden, config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:  # [tokens, hidden]
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        attended = bidirectional_attention(q, k, v, seq_lens, self.scale)  # [tokens, heads, head_dim]
        x = self.attention_norm(x + self.attention_output(attended.reshape(tokens, -1)))
        return self.output_norm(x + self.mlp(x))


class BertModel(nn.Module):
    """Token ids of a flat batch -> last-layer hidden states, ``[tokens, hidden]``.

    ``backends`` (the decoders' paged attention, one per layer) are accepted for build_model's signature and
    not used: an encoder attends bidirectionally over each whole sequence, which needs no cache.
    """

    def __init__(
        self, config: BertConfig, backends: Sequence[AttentionBackend], dtype: torch.dtype, tp=None
    ) -> None:
        super().__init__()  # tp: always one device (build_model refuses more for encoders)
        self.config = config
        self.dtype = dtype

        def table(rows: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(rows, config.hidden_size, dtype=dtype), requires_grad=False)

        self.word_embeddings = table(config.vocab_size)
        self.position_embeddings = table(config.max_position_embeddings)
        self.token_type_embeddings = table(config.type_vocab_size)
        self.embedding_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)
        self.layers = nn.ModuleList(BertLayer(config, dtype) for _ in range(config.num_layers))

    def encode(self, input_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """``input_ids`` [tokens]: ``seq_lens`` sequences back to back -> hidden states [tokens, hidden]."""
        if sum(seq_lens) != input_ids.shape[0]:
            raise ValueError(f"seq_lens add up to {sum(seq_lens)}, but there are {input_ids.shape[0]} tokens")
        if max(seq_lens, default=0) > self.config.max_position_embeddings:
            raise ValueError(
                f"a sequence of {max(seq_lens)} tokens is longer than the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        device = input_ids.device
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])  # [tokens]
        # Every input is one segment (token type 0), as a tokenizer gives a single text.
        hidden = (
            F.embedding(input_ids, self.word_embeddings)
            + F.embedding(positions, self.position_embeddings)
            + self.token_type_embeddings[0]
        )  # [tokens, hidden]
        hidden = self.embedding_norm(hidden)
        for layer in self.layers:
            hidden = layer(hidden, seq_lens)
        return hidden

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Once weights are loaded: hand every projection to its fast kernel (see layers/matmul.py)."""
        if runs_blocks(quantization):
            raise ValueError("quantization 'gguf' needs a GGUF checkpoint; BertModel loads from safetensors")
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare(quantization)

    def load_weights(self, weights: Mapping[str, torch.Tensor], keep_blocks: bool = False) -> None:
        """Copy HF-named tensors into place; unknown or missing names raise ``ValueError``.

        The pooler (dense + tanh over [CLS], for next-sentence prediction) is not part of an embedding and is
        skipped, as sentence-transformers does.
        """
        load_into(weights, self.weight_targets(), self.dtype, _ignorable)

    def weight_targets(self) -> dict[str, Loader]:
        """HF tensor name -> function copying that tensor into place."""
        targets: dict[str, Loader] = {
            "embeddings.word_embeddings.weight": copier(self.word_embeddings),
            "embeddings.position_embeddings.weight": copier(self.position_embeddings),
            "embeddings.token_type_embeddings.weight": copier(self.token_type_embeddings),
            "embeddings.LayerNorm.weight": copier(self.embedding_norm.weight),
            "embeddings.LayerNorm.bias": copier(self.embedding_norm.bias),
        }
        for i, layer in enumerate(self.layers):
            prefix = f"encoder.layer.{i}."
            for shard, part in enumerate(("query", "key", "value")):
                targets[f"{prefix}attention.self.{part}.weight"] = layer.qkv_proj.shard(shard)
                targets[f"{prefix}attention.self.{part}.bias"] = partial(
                    layer.qkv_proj.load_bias_shard, shard
                )
            for hf_name, linear in (
                ("attention.output.dense", layer.attention_output),
                ("intermediate.dense", layer.mlp.intermediate),
                ("output.dense", layer.mlp.output),
            ):
                targets[f"{prefix}{hf_name}.weight"] = linear.shard(0)
                targets[f"{prefix}{hf_name}.bias"] = partial(linear.load_bias_shard, 0)
            for hf_name, norm in (
                ("attention.output.LayerNorm", layer.attention_norm),
                ("output.LayerNorm", layer.output_norm),
            ):
                targets[f"{prefix}{hf_name}.weight"] = copier(norm.weight)
                targets[f"{prefix}{hf_name}.bias"] = copier(norm.bias)
        return targets


def _ignorable(name: str) -> bool:
    # The next-sentence pooler, and the position-id buffer older exporters save.
    return name.startswith("pooler.") or name == "embeddings.position_ids"
