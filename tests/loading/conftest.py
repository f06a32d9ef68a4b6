"""Shared fixtures for the loading tests: the default GGUF (ours and transformers' view of it) and tiny GGUFs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import pytest

from longserve.loading.errors import ModelLoadError

# A tiny byte-level vocabulary: 256 byte tokens, a few merges, chat control tokens.
_BYTE_CHARS = [
    *(chr(c) for c in range(ord("!"), ord("~") + 1)),
    *(chr(c) for c in range(ord("¡"), ord("¬") + 1)),
    *(chr(c) for c in range(ord("®"), ord("ÿ") + 1)),
]
_BYTE_CHARS += [chr(256 + i) for i in range(256 - len(_BYTE_CHARS))]  # the remapped (unprintable) bytes
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "1 2", "12 3", "123 4", "4 5", "Ġ w"]
TINY_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Tokens and token types: control tokens first (ids 0..2), then bytes, then merge results."""
    merged = ["he", "ll", "hell", "hello", "12", "123", "1234", "45", "Ġw"]
    tokens = TINY_CONTROL + _BYTE_CHARS + merged
    types = [3] * len(TINY_CONTROL) + [1] * (len(tokens) - len(TINY_CONTROL))
    return tokens, types


@pytest.fixture(scope="session")
def tiny_tokens() -> list[str]:
    return tiny_vocab()[0]


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from longserve.loading.default_model import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_checkpoint(default_gguf_path: str):
    from longserve.loading.gguf_loader import load_gguf

    return load_gguf(default_gguf_path)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf_path: str):
    """transformers' own tokenizer built from the same GGUF: the oracle for ours."""
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(default_gguf_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture
def write_gguf(tmp_path) -> Callable[..., str]:
    """Factory: write a small but complete GGUF (config keys, tiny tokenizer, given tensors) and return its path.

    ``tensors`` maps GGUF tensor names to ``(array, qtype)``: float arrays are quantized with gguf's own quantizer;
    a uint8 array with a quantized qtype is taken as raw blocks. ``metadata`` overrides or adds keys (value None
    drops a key).
    """

    def write(
        tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
        *,
        arch: str = "llama",
        metadata: dict[str, Any] | None = None,
        name: str = "tiny.gguf",
    ) -> str:
        path = str(tmp_path / name)
        writer = gguf.GGUFWriter(path, arch)
        tokens, types = tiny_vocab()
        keys: dict[str, Any] = {
            f"{arch}.embedding_length": 16,
            f"{arch}.block_count": 1,
            f"{arch}.feed_forward_length": 32,
            f"{arch}.attention.head_count": 4,
            f"{arch}.attention.head_count_kv": 2,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{arch}.rope.freq_base": 10000.0,
            f"{arch}.context_length": 128,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": TINY_MERGES,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": TINY_TEMPLATE,
        }
        keys.update(metadata or {})
        for key, value in keys.items():
            _add_key(writer, key, value)
        for tensor_name, (array, qtype) in (tensors or {}).items():
            if array.dtype == np.uint8 and qtype not in (gguf.GGMLQuantizationType.F32,):
                writer.add_tensor(tensor_name, array, raw_dtype=qtype)
            elif qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype))
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write


def _add_key(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)
