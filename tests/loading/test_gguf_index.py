"""The GGUF index: a second open reads the metadata and tensor directory from the cached index (same values,
same tensor bytes), a changed file is parsed again, and an unreadable index is ignored."""

from __future__ import annotations

import os
import shutil

import numpy as np

from longserve.loading.default_model import default_model_path
from longserve.loading.gguf_index import _cache_path, read_index


def test_the_index_gives_what_parsing_gives_and_follows_changes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), model)
    parsed_metadata, parsed = read_index(str(model))
    index = _cache_path(str(model))
    assert index.is_file()
    metadata, indexed = read_index(str(model))
    assert metadata == parsed_metadata
    assert [t.name for t in indexed] == [t.name for t in parsed]
    for a, b in zip(indexed, parsed, strict=True):
        assert (a.tensor_type, list(a.shape), a.n_bytes) == (b.tensor_type, list(b.shape), b.n_bytes)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    os.utime(model, ns=(1, 1))  # changed: another key, parsed again
    assert _cache_path(str(model)) != index
    assert read_index(str(model))[0] == parsed_metadata
    _cache_path(str(model)).write_text("{not json")
    assert read_index(str(model))[0] == parsed_metadata
    assert "ignoring an unreadable GGUF index" in caplog.text
