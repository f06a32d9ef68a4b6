"""DecoderConfig: the typed subset of a HF ``config.json`` that a Llama-family decoder needs, checked on read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, config: dict, *, qkv_bias: bool = False, qk_norm: bool = False) -> DecoderConfig:
        """Read a HF config dict; a missing or inconsistent field raises ``ValueError`` naming it."""

        def need(key: str, kind: type = int):
            if key not in config or config[key] is None:
                raise ValueError(f"config.json: missing required field {key!r}")
            value = config[key]
            if kind is int and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
            return kind(value)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = config.get("head_dim") or hidden // heads
        # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else rope
        return cls(
            architecture=config["architectures"][0],
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_usable_context(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", qkv_bias)),
            qk_norm=qk_norm,
        )


def _usable_context(config: dict) -> int:
    """Context length we can serve exactly. Sliding-window attention is not implemented, so a model that
    uses it is capped at its window, where full attention and the sliding window agree."""
    context = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config.get("model_type") != "qwen2")
    if isinstance(window, int) and window > 0 and uses_window:
        return min(context, window)
    return context
