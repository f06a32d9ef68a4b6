"""Model selection by architecture name, and clear errors for checkpoints we cannot run."""

import json
import os
import shutil

import pytest
import torch
from tiny_models import TINY_SPECS, build_hf_model

from longserve import LLM
from longserve.attention.backend import get_backend
from longserve.layers.linear import ShardTarget
from longserve.loading.errors import ModelLoadError
from longserve.models.interface import CausalLM, Encoder
from longserve.models.registry import build_model, supported_architectures


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


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_every_decoder_family_keeps_the_engine_interface(name):
    """The engine calls models only through models/interface.py: each family's class must keep it, and name
    its projections (LoRA finds them by their ``ShardTarget``)."""
    hf = build_hf_model(name, vocab_size=64)
    config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    model, _ = build_model(config, get_backend("dense"), torch.float32)
    assert isinstance(model, CausalLM) and not isinstance(model, Encoder)
    projections = [n for n, t in model.weight_targets().items() if isinstance(t, ShardTarget)]
    assert any(n.endswith("o_proj.weight") for n in projections), projections[:5]
    assert set(model.weight_targets()) >= {n for n, _ in hf.named_parameters() if "embed" in n}


def test_an_encoder_family_keeps_the_encoder_interface(tmp_path):
    from embedding_models import write_tiny_bert

    directory = write_tiny_bert(tmp_path / "bert")
    config = json.load(open(os.path.join(directory, "config.json")))
    model, _ = build_model(config, get_backend("dense"), torch.float32)
    assert isinstance(model, Encoder) and not isinstance(model, CausalLM)
