"""Model selection by architecture name, and clear errors for checkpoints we cannot run."""

import json
import os
import shutil

import pytest

from longserve import LLM
from longserve.loading.errors import ModelLoadError
from longserve.models.registry import supported_architectures


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return str(dst)


def test_supported_architectures_cover_the_llama_family():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures()
    )


def test_unknown_architecture_names_itself_and_the_supported_ones(tiny_llama_dir, tmp_path):
    model_dir = _copy_with_config(tiny_llama_dir, tmp_path / "m", architectures=["MambaForCausalLM"])
    with pytest.raises(
        ModelLoadError, match=r"unsupported architecture 'MambaForCausalLM'.*LlamaForCausalLM"
    ):
        LLM(model_dir)


def test_inconsistent_head_counts_are_reported(tiny_llama_dir, tmp_path):
    model_dir = _copy_with_config(tiny_llama_dir, tmp_path / "m", num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        LLM(model_dir)


def test_weights_of_the_wrong_shape_are_reported(tiny_llama_dir, tmp_path):
    model_dir = _copy_with_config(tiny_llama_dir, tmp_path / "m", intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"mlp\..*shape"):
        LLM(model_dir)


def test_missing_model_path_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


def test_sliding_window_models_are_capped_at_their_window(tiny_mistral_dir, tmp_path):
    model_dir = _copy_with_config(tiny_mistral_dir, tmp_path / "m", sliding_window=128)
    assert LLM(model_dir).engine.max_model_len == 128
