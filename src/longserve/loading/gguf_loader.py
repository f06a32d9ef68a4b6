"""Load a GGUF file into a Checkpoint: HF-style config, dequantized float32 weights with HF names, tokenizer."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from longserve.loading.checkpoint import Checkpoint
from longserve.loading.errors import ModelLoadError
from longserve.loading.gguf_blocks import BLOCK_TYPES, Blocks, read_blocks
from longserve.loading.gguf_index import read_index
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

_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ rope scaling, as divisors of each rotary frequency
_Array = TypeVar("_Array", torch.Tensor, np.ndarray)


def load_gguf(path: str, *, show_progress: bool = False) -> Checkpoint:
    """Read ``path``; every problem with the file surfaces as a ``ModelLoadError`` naming it."""
    path = os.fspath(path)
    metadata, all_tensors = read_index(path)
    names = {t.name for t in all_tensors}
    config = gguf_config(metadata, has_output="output.weight" in names, has_bias="blk.0.attn_q.bias" in names)
    for rope_freqs in (t for t in all_tensors if t.name == _ROPE_FREQS):  # config, not a weight
        config["rope_scaling"] = llama3_rope_scaling(_dequantize(rope_freqs, path), config)
    tensors = [t for t in all_tensors if t.name != _ROPE_FREQS]
    hf_names = [hf_tensor_name(t.name) for t in tensors]  # fail on an unknown name before any work
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    for qtype in {t.tensor_type for t in tensors}:  # dequantization is lazy: refuse unknown types now
        _check_dequantizable(qtype, next(t.name for t in tensors if t.tensor_type == qtype), path)
    weights = _LazyDequantized(dict(zip(hf_names, tensors, strict=True)), config, path, show_progress)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, path=path, format="gguf")


class _LazyDequantized(Mapping[str, torch.Tensor]):
    """HF name -> float32 tensor, dequantized when read, so only one tensor is ever expanded at a time."""

    def __init__(
        self, tensors: dict[str, Any], config: dict[str, Any], path: str, show_progress: bool
    ) -> None:
        self._tensors = tensors
        self._config = config
        self._path = path
        self._progress = _progress(len(tensors), show_progress, os.path.basename(path))

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        tensor = self._tensors[hf_name]
        value = _dequantize(tensor, self._path)
        if self._config["model_type"] == "llama":  # only convert_hf_to_gguf's LlamaModel permutes
            value = _unpermute_if_qk(hf_name, value, self._config)
        if self._progress is not None:
            self._progress.advance()
        return torch.from_numpy(value)

    def has_blocks(self) -> bool:
        """Whether any 2-D tensor is stored in a block format the low-bit kernels run."""
        return any(t.tensor_type in BLOCK_TYPES and len(t.shape) == 2 for t in self._tensors.values())

    def blocks(self, hf_name: str, *, counts_as_read: bool = True) -> Blocks | None:
        """The tensor as its low-bit blocks (``BLOCK_TYPES``, rows un-permuted like the values), else None.

        ``counts_as_read=False`` for a tensor that is also read as floats (tied embeddings), so the progress
        bar counts it once."""
        tensor = self._tensors[hf_name]
        if tensor.tensor_type not in BLOCK_TYPES or len(tensor.shape) != 2:
            return None
        raw = tensor.data  # [rows, bytes per row]
        if self._config["model_type"] == "llama":
            raw = _unpermute_if_qk(hf_name, raw, self._config)
        if self._progress is not None and counts_as_read:
            self._progress.advance()
        return read_blocks(raw, tensor.tensor_type)

    def __contains__(self, hf_name: object) -> bool:
        # Mapping's own would read (and so dequantize) the tensor: the embedding table, 113 MB and 0.3 s.
        return hf_name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


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
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known Hugging Face counterpart")


def llama3_rope_scaling(freq_factors: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """HF's ``rope_scaling`` for the per-frequency divisors llama.cpp stores as ``rope_freqs.weight``.

    convert_hf_to_gguf bakes Llama 3.1+'s scaling into those divisors; every released Llama 3.x uses
    low/high frequency factors 1 and 4 over an original 8192-token context, so only ``factor`` varies (it is the
    largest divisor). The divisors are recomputed from the result and must match, so nothing is guessed silently.
    """
    factors = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dim = config["head_dim"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]
    if factors.shape != inv_freq.shape or not np.allclose(
        factors, _llama3_divisors(inv_freq, scaling), rtol=1e-4
    ):
        raise ModelLoadError(f"GGUF {_ROPE_FREQS} does not follow Llama 3's rope scaling; not supported")
    return scaling


def _llama3_divisors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """What convert_hf_to_gguf writes to rope_freqs for these scaling parameters."""
    old_context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, between))


def permute_qk(w: _Array, n_head: int) -> _Array:
    """llama.cpp's convert_hf_to_gguf row permutation of q_proj/k_proj (HF layout -> GGUF layout).

    HF rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs, so the converter
    interleaves each head's rows: [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...].
    """
    rows = w.shape[0]
    # [rows, *rest] -> [n_head, 2, rows/n_head/2, *rest] -> swap -> [rows, *rest]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: _Array, n_head: int) -> _Array:
    """Inverse of :func:`permute_qk` (GGUF layout -> HF layout); the result is contiguous."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(
            f"q/k projection with {rows} rows cannot be split into {n_head} heads of even size"
        )
    # [rows, *rest] -> [n_head, rows/n_head/2, 2, *rest] -> swap -> [rows, *rest]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_if_qk(hf_name: str, value: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    if ".self_attn.q_proj." in hf_name:
        return unpermute_qk(value, config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return unpermute_qk(value, config["num_key_value_heads"])
    return value


def _dequantize(tensor: Any, path: str) -> np.ndarray:
    qtype = tensor.tensor_type
    # GGUF lists dims fastest-varying first; torch (and HF) list them slowest first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
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
    return values.reshape(shape)


def _check_dequantizable(qtype: Any, tensor_name: str, path: str) -> None:
    """Dequantize one all-zero block of this type; a type gguf cannot expand fails here, naming a tensor."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {tensor_name} has type {qtype.name}, which cannot be dequantized"
        ) from None


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


class _Progress:
    """A transient loading bar that closes itself once every tensor has been read."""

    def __init__(self, total: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import Progress

        # stderr, so stdout stays the program's output (a served URL, generated text)
        self._bar = Progress(transient=True, console=Console(stderr=True))
        self._task = self._bar.add_task(f"Loading {label}", total=total)
        self._left = total
        self._bar.start()

    def advance(self) -> None:
        self._bar.advance(self._task)
        self._left -= 1
        if self._left == 0:
            self._bar.stop()


def _progress(total: int, show: bool, label: str) -> _Progress | None:
    return _Progress(total, label) if show and total else None
