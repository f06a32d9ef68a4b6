"""Shared fixtures: tiny random HF checkpoints (one per architecture), built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests import helpers as top-level modules (``import tiny_models``) under any pytest import mode.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import tiny_models  # noqa: E402


class TinyModelCache:
    """Builds each tiny checkpoint on first request into one session directory and remembers its path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, str] = {}
        self._tokenizer = None

    def path(self, name: str) -> str:
        if name not in self._paths:
            if self._tokenizer is None:
                self._tokenizer = tiny_models.train_tokenizer()
            self._paths[name] = tiny_models.write_tiny_model(
                name, self.root / name, tokenizer=self._tokenizer
            )
        return self._paths[name]


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> TinyModelCache:
    return TinyModelCache(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_model_cache: TinyModelCache) -> dict[str, str]:
    """Every tiny architecture: name (``llama``, ``llama_tied``, ``llama3_rope``, ...) → checkpoint directory."""
    return {name: tiny_model_cache.path(name) for name in tiny_models.TINY_SPECS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("llama")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("llama_tied")


@pytest.fixture(scope="session")
def tiny_llama3_rope_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("llama3_rope")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("qwen3")


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("mixtral")


@pytest.fixture(scope="session")
def tiny_qwen2_moe_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("qwen2_moe")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("qwen3_moe")


@pytest.fixture(scope="session")
def tiny_deepseek_v2_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("deepseek_v2")


@pytest.fixture(scope="session")
def tiny_deepseek_v3_dir(tiny_model_cache: TinyModelCache) -> str:
    return tiny_model_cache.path("deepseek_v3")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``tiny_llama_dir`` re-saved as two shards plus ``model.safetensors.index.json``."""
    return tiny_models.write_sharded_copy(tiny_llama_dir, tmp_path_factory.mktemp("tiny_llama_sharded"))


# Embedding checkpoints laid out as sentence-transformers ships them (tests/embedding_models.py).
@pytest.fixture(scope="session")
def tiny_qwen3_embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``Qwen3Model`` with last-token pooling + Normalize, its tokenizer appending ``<|endoftext|>``."""
    import embedding_models

    return embedding_models.write_tiny_qwen3_embedding(tmp_path_factory.mktemp("tiny_qwen3_embedding"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``BertModel`` with a WordPiece tokenizer, CLS pooling + Normalize."""
    import embedding_models

    return embedding_models.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), pooling="cls")


@pytest.fixture(scope="session")
def tiny_bert_mean_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``BertModel`` with mean pooling and no Normalize module (its embeddings are not unit vectors)."""
    import embedding_models

    return embedding_models.write_tiny_bert(
        tmp_path_factory.mktemp("tiny_bert_mean"), pooling="mean", normalize=False
    )


@pytest.fixture(autouse=True)
def _small_default_kv_pool(monkeypatch):
    """Engines built in this process default to a 64 MiB CPU pool instead of 1 GiB: the pool is committed
    (zeroed) at start, and hundreds of test engines would each write a GiB. Tests that size the cache say
    so; processes a test starts keep the real default."""
    from longserve.engine import kv_sizing

    monkeypatch.setattr(kv_sizing, "CPU_DEFAULT_MB", 64)
