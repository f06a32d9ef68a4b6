"""``--model`` as people write it: a Hugging Face repo id found in the local hub cache (offline), at a
branch, tag or commit; a repo holding one GGUF file; a clear error naming the id and the cache otherwise;
``--served-model-name`` aliases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from longserve import LLM, SamplingParams
from longserve.loading.errors import ModelLoadError
from longserve.loading.model_resolution import is_hub_id, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT, refs: tuple = ("main",)) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    if source.is_dir():
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(source, snapshot / source.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


def test_a_repo_id_in_the_hub_cache_loads_offline(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = _cache_repo(tmp_path, "acme/tiny-llama", Path(tiny_llama_dir), refs=("main", "v1"))
    assert resolve_model_path("acme/tiny-llama") == str(snapshot)
    assert resolve_model_path("acme/tiny-llama", "v1") == resolve_model_path("acme/tiny-llama", COMMIT)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_id = LLM("acme/tiny-llama").generate(["hello"], params)[0].outputs[0].token_ids
    assert by_id == LLM(tiny_llama_dir).generate(["hello"], params)[0].outputs[0].token_ids


def test_a_missing_id_names_the_id_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"'Qwen/Qwen3-0.6B' is not a local path.*" + str(tmp_path)):
        resolve_model_path("Qwen/Qwen3-0.6B")
    with pytest.raises(ModelLoadError, match="revision 'v9'"):
        resolve_model_path("Qwen/Qwen3-0.6B", "v9")
    assert not is_hub_id("./model") and not is_hub_id("/abs/path") and is_hub_id("org/name-1.5B")


def test_a_repo_of_one_gguf_file_resolves_to_it(tmp_path, monkeypatch):
    from longserve.loading.default_model import default_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    gguf = Path(default_model_path())
    snapshot = _cache_repo(tmp_path, "acme/smol-gguf", gguf)
    assert resolve_model_path("acme/smol-gguf") == str(snapshot / gguf.name)
    shutil.copy(gguf, snapshot / "other.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_model_path("acme/smol-gguf")


def test_served_model_names_are_aliases():
    from longserve.cli import _serve_config, build_parser
    from longserve.config import EngineConfig
    from longserve.serve.launcher import served_names

    args = build_parser().parse_args(["serve", "--served-model-name", "smol", "gpt-small"])
    assert served_names(_serve_config(args), EngineConfig()) == ["smol", "gpt-small"]
    plain = build_parser().parse_args(["serve", "--model", "Qwen/Qwen3-0.6B"])
    assert served_names(_serve_config(plain), EngineConfig(model="Qwen/Qwen3-0.6B")) == ["Qwen/Qwen3-0.6B"]
