"""A GGUF file's metadata and tensor directory. gguf's reader parses every metadata array element by
element in Python (~0.7 s for a 49K-token vocabulary, most of a warm start), so what it found is kept in a
small JSON index per file (path, size and modification time) under ``~/.cache/longserve/gguf-index``, and a
later start maps the tensors straight from their offsets."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape

from longserve.loading.errors import ModelLoadError

log = logging.getLogger(__name__)

_VERSION = 1
Q = gguf.GGMLQuantizationType
# Types stored as plain arrays of one item type; every other type is blocks, read as bytes.
_PLAIN = {Q.F16: np.float16, Q.F32: np.float32, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
          Q.I32: np.int32, Q.I64: np.int64}  # fmt: skip


@dataclass
class IndexedTensor:
    """What the loader reads of a tensor: as gguf's ``ReaderTensor`` has it."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: fastest-varying first
    n_bytes: int
    data_offset: int
    data: np.ndarray  # a view of the file's mapping: items, or [rows, bytes per row] for block types


def read_index(path: str) -> tuple[dict[str, Any], list]:
    """The file's metadata (``GGUF.*`` entries left out) and tensors; a bad file raises ``ModelLoadError``."""
    _check_file(path)
    cache = _cache_path(path)
    if cache is not None and cache.is_file():
        try:
            index = json.loads(cache.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable GGUF index %s (%s); parsing %s again", cache, exc, path)
        else:
            if index.get("version") == _VERSION:
                return index["metadata"], _mapped_tensors(path, index["tensors"])
    reader = _open(path)
    metadata = {
        name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }
    if cache is not None:
        _write_index(cache, metadata, reader.tensors)
    return metadata, reader.tensors


def _cache_path(path: str) -> Path | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longserve" / "gguf-index"
    key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return root / f"{hashlib.sha256(key).hexdigest()[:24]}.json"


def _write_index(cache: Path, metadata: dict[str, Any], tensors: list) -> None:
    entries = [[t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.n_bytes), int(t.data_offset)]
               for t in tensors]  # fmt: skip
    try:
        text = json.dumps({"version": _VERSION, "metadata": metadata, "tensors": entries})
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(text)
        os.replace(temporary, cache)  # whole or not at all, whoever else writes it meanwhile
    except (
        OSError,
        TypeError,
        ValueError,
    ) as exc:  # a read-only home or an odd value: start slower next time
        log.warning("could not write the GGUF index %s: %s", cache, exc)


def _mapped_tensors(path: str, entries: list) -> list[IndexedTensor]:
    mapping = np.memmap(path, mode="r").view(np.ndarray)  # the views keep the mapping alive
    tensors = []
    for name, kind, shape, n_bytes, offset in entries:
        qtype = Q(kind)
        if offset + n_bytes > mapping.shape[0]:
            raise ModelLoadError(f"{path}: truncated GGUF file: tensor {name} runs past the end")
        dims = tuple(reversed(shape))
        raw = mapping[offset : offset + n_bytes]
        if qtype in _PLAIN:
            data = raw.view(_PLAIN[qtype]).reshape(dims)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(dims, qtype))
        tensors.append(IndexedTensor(name, qtype, np.array(shape, dtype=np.uint64), n_bytes, offset, data))
    return tensors


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"{path}: empty file, not a GGUF model")


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


def _open(path: str) -> _Reader:
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
