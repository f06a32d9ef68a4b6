"""Multi-head Latent Attention against HF's DeepseekV3Attention on random weights, through the paged cache.

Covers what the tiny whole-model checkpoints do not all reach: YaRN rope scaling (frequencies, cos/sin
multiplier and softmax mscale), attention biases, both RoPE layouts, and v_head_dim > qk_head_dim (the q/k
padding path).
"""

import pytest
import torch

from longserve.attention.backend import get_backend
from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.layers.mla import (
    MLAConfig,
    MLARotary,
    MultiHeadLatentAttention,
    deinterleave_rope_rows,
    mla_softmax_scale,
)

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

BLOCK = 4
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,  # x factor = max_position_embeddings
    "mscale": 1.0,  # != mscale_all_dim, so cos/sin are scaled too
    "mscale_all_dim": 0.707,
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}
CASES = {
    # No q LoRA (as V2-Lite), YaRN, checkpoint RoPE in rotate-half order.
    "no_q_lora_yarn": dict(q_lora_rank=None, rope_interleave=False, rope_parameters=YARN),
    # q LoRA with biases (the k_pe bias rows are reordered too), paired RoPE, values wider than q/k heads.
    "q_lora_bias_wide_v": dict(
        q_lora_rank=24,
        attention_bias=True,
        rope_interleave=True,
        v_head_dim=40,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}


def _hf_config(case: str):
    kwargs = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=128,
    )
    kwargs.update(CASES[case])
    config = transformers.DeepseekV3Config(**kwargs)
    config._attn_implementation = "eager"
    return config


def _build(case: str, backend: str):
    """(HF attention, rotary, our attention with the same weights, our rotary)."""
    config = _hf_config(case)
    torch.manual_seed(0)
    hf = hf_v3.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if "norm" in name else noise * param.shape[-1] ** -0.5)
    mla = MLAConfig(
        hidden_size=64,
        num_heads=4,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=config.v_head_dim,
        attention_bias=config.attention_bias,
        rope_interleave=config.rope_interleave,
    )
    rope = dict(config.rope_parameters)
    theta = rope.pop("rope_theta")
    scaling = None if rope["rope_type"] == "default" else rope
    ours = MultiHeadLatentAttention(
        mla, mla_softmax_scale(mla.qk_head_dim, scaling), get_backend(backend), torch.float32
    )
    loaders = ours.weight_loaders("")
    state = hf.state_dict()
    assert set(loaders) == set(state), set(loaders) ^ set(state)
    for name, tensor in state.items():
        loaders[name](tensor)
    return hf, hf_v3.DeepseekV3RotaryEmbedding(config), ours, MLARotary(8, 128, theta, scaling)


def _hf_forward(hf, hf_rotary, x: torch.Tensor) -> torch.Tensor:
    tokens = x.shape[0]
    positions = torch.arange(tokens)[None]
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out, _ = hf(x[None], position_embeddings=hf_rotary(x[None], positions), attention_mask=mask)
    return out[0]


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mla_matches_hf_whole_prompt_and_step_by_step(case, backend):
    hf, hf_rotary, ours, rotary = _build(case, backend)
    x = torch.randn(23, 64, generator=torch.Generator().manual_seed(1))
    expected = _hf_forward(hf, hf_rotary, x)

    c = ours.config
    caches = allocate_kv_cache(1, 16, BLOCK, c.num_heads, c.cache_head_dim, torch.float32)
    table = (torch.randperm(15, generator=torch.Generator().manual_seed(2)) + 1).tolist()
    rows, computed = [], 0
    with torch.inference_mode():
        for chunk in (x[:7], *x[7:].split(1)):  # a prompt chunk, then one token at a time
            n = chunk.shape[0]
            metadata = build_attention_metadata([table], [computed], [n], BLOCK)
            positions = torch.arange(computed, computed + n)
            rows.append(ours(chunk, rotary.lookup(positions, torch.float32), caches[0], metadata))
            computed += n
    torch.testing.assert_close(torch.cat(rows), expected, rtol=1e-5, atol=1e-5)


def test_yarn_tables_and_softmax_scale_match_hf():
    config = _hf_config("no_q_lora_yarn")
    hf_rotary = hf_v3.DeepseekV3RotaryEmbedding(config)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1), torch.arange(128)[None])
    rope = {k: v for k, v in YARN.items() if k != "rope_theta"}
    ours = MLARotary(8, 128, 10000.0, rope)
    torch.testing.assert_close(ours.cos, hf_cos[0, :, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin, hf_sin[0, :, :4], rtol=0, atol=1e-6)
    assert mla_softmax_scale(24, rope) == pytest.approx(hf_v3.DeepseekV3Attention(config, 0).scaling)
    assert mla_softmax_scale(24, rope) != pytest.approx(24**-0.5)  # the mscale correction really applies


def test_deinterleaving_rows_turns_pair_rotation_into_rotate_half():
    """Rotating pairs (x0, x1), (x2, x3)... equals rotate-half after the row permutation, for q.k products."""
    generator = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, 8, generator=generator)  # [tokens, rope]
    freqs = torch.outer(torch.arange(5.0), torch.rand(4, generator=generator))
    complex_rot = torch.polar(torch.ones_like(freqs), freqs)

    def pair_rotation(x):  # HF DeepSeek-V2's formulation
        return torch.view_as_real(torch.view_as_complex(x.reshape(5, 4, 2)) * complex_rot).flatten(1)

    from longserve.layers.rotary import apply_rotary

    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    perm_q = deinterleave_rope_rows(q.T, 8, 8).T[:, None]  # permute the "rows" (dims) of each vector
    perm_k = deinterleave_rope_rows(k.T, 8, 8).T[:, None]
    ours = apply_rotary(perm_q, cos, sin)[:, 0] @ apply_rotary(perm_k, cos, sin)[:, 0].T
    torch.testing.assert_close(ours, pair_rotation(q) @ pair_rotation(k).T)


def test_bad_shapes_name_the_field():
    base = dict(
        hidden_size=64,
        num_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        attention_bias=False,
        rope_interleave=True,
    )
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig(**{**base, "qk_rope_head_dim": 7})
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAConfig(**{**base, "kv_lora_rank": 0})
    with pytest.raises(ValueError, match="q_lora_rank"):
        MLAConfig(**{**base, "q_lora_rank": -3})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        MLARotary(8, 16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
