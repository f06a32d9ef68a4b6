"""Load a GGUF file into a Checkpoint: HF-style config, dequantized float32 weights with HF names, tokenizer."""

from __future__ import annotations

import os
import re
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from longserve.loading.checkpoint import Checkpoint
from longserve.loading.errors import ModelLoadError
from longserve.loading.tokenizer import Tokenizer

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_TOP_LEVEL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_NAME = re.compile(r"(\w+)\.(weight|bias)")


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of the mmap.

    The reader slices its buffer once per array element (~100k times for a vocabulary); on a ``np.memmap``
    each slice pays for the subclass's bookkeeping, which makes opening a file 3x slower.
    """

    @property
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)  # the view keeps the memmap (and so the mapping) alive


def load_gguf(path: str, *, show_progress: bool = False) -> Checkpoint:
    """Read ``path``; every problem with the file surfaces as a ``ModelLoadError`` naming it."""
    path = os.fspath(path)
    reader = _open(path)
    metadata = {
        name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }
    names = {t.name for t in reader.tensors}
    config = gguf_config(metadata, has_output="output.weight" in names, has_bias="blk.0.attn_q.bias" in names)
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    weights: dict[str, torch.Tensor] = {}
    for tensor in _progress(reader.tensors, show_progress, os.path.basename(path)):
        hf_name = hf_tensor_name(tensor.name)
        value = _dequantize(tensor, path)
        if config["model_type"] == "llama":
            value = _unpermute_if_qk(hf_name, value, config)
        weights[hf_name] = value
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, path=path, format="gguf")


def gguf_config(
    metadata: dict[str, Any], *, has_output: bool = True, has_bias: bool = False
) -> dict[str, Any]:
    """A HF ``config.json``-style dict from GGUF metadata (llama.cpp key names)."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(_ARCHITECTURES))})"
        )

    def get(key: str, default: Any = ModelLoadError) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is ModelLoadError:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = _uniform(get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv")
    vocab_size = get("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens") or ())
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = has_bias
        config["mlp_bias"] = False
    scaling = _rope_scaling(metadata, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names raise."""
    if m := _BLOCK_NAME.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"
    elif (m := _TOP_NAME.fullmatch(gguf_name)) and m.group(1) in _TOP_LEVEL_TENSORS:
        return f"{_TOP_LEVEL_TENSORS[m.group(1)]}.{m.group(2)}"
    if gguf_name == "rope_freqs.weight":
        raise ModelLoadError(
            "GGUF tensor rope_freqs.weight (Llama-3.1-style rope scaling) is not supported yet"
        )
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known Hugging Face counterpart")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf row permutation of q_proj/k_proj (HF layout -> GGUF layout).

    HF rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs, so the converter
    interleaves each head's rows: [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...].
    """
    rows = w.shape[0]
    # [rows, *rest] -> [n_head, 2, rows/n_head/2, *rest] -> swap -> [rows, *rest]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk` (GGUF layout -> HF layout)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(
            f"q/k projection with {rows} rows cannot be split into {n_head} heads of even size"
        )
    # [rows, *rest] -> [n_head, rows/n_head/2, 2, *rest] -> swap -> [rows, *rest]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_if_qk(hf_name: str, value: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    if ".self_attn.q_proj." in hf_name:
        return unpermute_qk(value, config["num_attention_heads"]).contiguous()
    if ".self_attn.k_proj." in hf_name:
        return unpermute_qk(value, config["num_key_value_heads"]).contiguous()
    return value


def _open(path: str) -> _Reader:
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        reader = _Reader(path)
    except Exception as e:  # the reader fails with ValueError, IndexError, KeyError, ... on bad bytes
        hint = "not a GGUF file" if "magic" in str(e) else "truncated or corrupt GGUF file"
        raise ModelLoadError(f"{path}: {hint} ({type(e).__name__}: {e})") from e
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ModelLoadError(f"{path}: truncated GGUF file: tensor {tensor.name} runs past the end")
    return reader


def _field_value(field: Any) -> Any:
    value = field.contents()
    # Arrays of numbers come back as lists already; a lone numpy scalar would leak numpy types into the config.
    return value.item() if isinstance(value, np.generic) else value


def _dequantize(tensor: Any, path: str) -> torch.Tensor:
    qtype = tensor.tensor_type
    shape = tuple(
        int(d) for d in reversed(tensor.shape.tolist())
    )  # GGUF lists dims fastest-first; HF slowest
    try:
        values = dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which cannot be dequantized"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name} ({qtype.name}) is malformed: {e}") from e
    # F32 comes back as a read-only view of the mmap; copy it so the weights own their (writable) memory.
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)
    return torch.from_numpy(values.reshape(shape))


def _uniform(value: Any, key: str) -> int:
    """Per-layer arrays (some GGUFs store head counts per layer) must hold one value for our models."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ModelLoadError(f"GGUF {key} differs between layers ({value}); not supported")
        value = value[0]
    return int(value)


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"GGUF rope scaling type {kind!r} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (value := metadata.get(f"{arch}.rope.scaling.{gguf_key}")) is not None:
            scaling[hf_key] = float(value)
    return scaling


def _progress(tensors: list, show: bool, label: str) -> Any:
    if not show:
        return tensors
    from rich.progress import track

    return track(tensors, description=f"Loading {label}", total=len(tensors), transient=True)
