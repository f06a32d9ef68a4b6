"""Loading HF safetensors directories: exact weights, sharding, memory mapping, and errors that name the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import save_file

from longserve.loading.checkpoint import Checkpoint, load_checkpoint
from longserve.loading.errors import ModelLoadError
from longserve.loading.safetensors_loader import load_safetensors_dir


def _mapped_file(address: int) -> str | None:
    """The file whose memory mapping contains ``address`` in this process, or None (heap, anonymous map)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_names(info: pytest.ExceptionInfo, *parts: str | os.PathLike) -> None:
    message = str(info.value)
    for part in parts:
        assert str(part) in message, f"{part} not named in: {message}"


# --- the fixtures are real HF checkpoints ------------------------------------------------------------------------

_TEXTS = [
    "Hello, world! 2024 is 3.14159",
    "café naïve 東京 🙂",
    "  spaces\n\n\tand tabs",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.mark.parametrize("name", sorted(tiny_models.TINY_SPECS))
def test_fixture_loads_in_transformers(name: str, tiny_model_dirs: dict[str, str]) -> None:
    import transformers

    path = tiny_model_dirs[name]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    raw_tok = tiny_models.train_tokenizer()
    for text in _TEXTS:
        ids = raw_tok.encode(text).ids
        assert hf_tok.encode(text) == ids and hf_tok.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tiny_models.BOS_ID, tiny_models.EOS_ID)
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    hf_model = tiny_models.load_hf_model(path)
    built = tiny_models.build_hf_model(name, raw_tok.get_vocab_size())
    assert hf_model.config.rope_parameters == built.config.rope_parameters  # survives the legacy-key rewrite
    loaded, expected = hf_model.state_dict(), built.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_fixture_weights_exercise_biases_norms_and_rope_scaling(tiny_model_dirs: dict[str, str]) -> None:
    qwen2 = load_safetensors_dir(tiny_model_dirs["qwen2"]).weights
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
    qwen3 = load_safetensors_dir(tiny_model_dirs["qwen3"])
    assert qwen3.config["head_dim"] * qwen3.config["num_attention_heads"] != qwen3.config["hidden_size"]
    assert (qwen3.weights["model.layers.0.self_attn.q_norm.weight"] - 1).abs().max() > 0.05
    llama3 = json.loads(Path(tiny_model_dirs["llama3_rope"], "config.json").read_text())
    scaling = llama3["rope_scaling"]
    assert (
        scaling["rope_type"] == "llama3"
        and llama3["max_position_embeddings"] > scaling["original_max_position_embeddings"]
    )


# --- what loads -----------------------------------------------------------------------------------------------


# MoE checkpoints are left out: transformers 5 fuses experts in memory but saves them per expert, so their
# state_dict names differ from the file's (the MoE logits tests cover loading those).
_DENSE = sorted(n for n in tiny_models.TINY_SPECS if not any(k in n for k in ("moe", "mixtral", "deepseek")))


@pytest.mark.parametrize("name", _DENSE)
def test_weights_equal_the_built_hf_model(name: str, tiny_model_dirs: dict[str, str]) -> None:
    path = tiny_model_dirs[name]
    ckpt = load_safetensors_dir(path)
    expected = tiny_models.build_hf_model(name, ckpt.config["vocab_size"]).state_dict()

    assert isinstance(ckpt, Checkpoint) and ckpt.format == "safetensors" and ckpt.path == path
    assert ckpt.config == json.loads(Path(path, "config.json").read_text())
    tied = ckpt.config.get("tie_word_embeddings", False)
    # A tied lm_head is stored once, as the embedding.
    assert set(ckpt.weights) == set(expected) - ({"lm_head.weight"} if tied else set())
    for key, tensor in ckpt.weights.items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, expected[key]), key


def test_sharded_and_unsharded_load_the_same_tensors(
    tiny_llama_dir: str, tiny_llama_sharded_dir: str
) -> None:
    shards = sorted(Path(tiny_llama_sharded_dir).glob("model-*.safetensors"))
    assert len(shards) == 2 and Path(tiny_llama_sharded_dir, "model.safetensors.index.json").exists()
    assert not Path(tiny_llama_sharded_dir, "model.safetensors").exists()

    single = load_safetensors_dir(tiny_llama_dir).weights
    sharded = load_safetensors_dir(tiny_llama_sharded_dir).weights
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_tensors_are_views_into_a_file_mapping(tiny_llama_sharded_dir: str) -> None:
    index = json.loads(Path(tiny_llama_sharded_dir, "model.safetensors.index.json").read_text())
    weights = load_safetensors_dir(tiny_llama_sharded_dir).weights
    for name, tensor in weights.items():
        shard = os.path.realpath(os.path.join(tiny_llama_sharded_dir, index["weight_map"][name]))
        assert _mapped_file(tensor.data_ptr()) == shard, name


def test_writing_to_a_loaded_tensor_leaves_the_file_alone(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    weights_file = path / "model.safetensors"
    before = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    weights = load_safetensors_dir(str(path)).weights
    weights["model.norm.weight"].mul_(0.0)  # the mapping is copy-on-write

    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == before
    assert torch.count_nonzero(load_safetensors_dir(str(path)).weights["model.norm.weight"]) > 0


def test_several_unindexed_files_load_together_in_their_stored_dtype(
    tiny_llama_dir: str, tmp_path: Path
) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    a = {"x.weight": torch.randn(3, 4).to(torch.bfloat16)}
    b = {"y.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_file(a, str(path / "part-a.safetensors"))
    save_file(b, str(path / "part-b.safetensors"))

    weights = load_safetensors_dir(str(path)).weights
    assert weights.keys() == {"x.weight", "y.weight"}
    assert weights["x.weight"].dtype == torch.bfloat16 and torch.equal(weights["x.weight"], a["x.weight"])
    assert weights["y.weight"].dtype == torch.float16 and torch.equal(weights["y.weight"], b["y.weight"])


def test_progress_bar_loads_the_same_weights(tiny_llama_sharded_dir: str) -> None:
    plain = load_safetensors_dir(tiny_llama_sharded_dir).weights
    with_bar = load_safetensors_dir(tiny_llama_sharded_dir, show_progress=True).weights
    assert plain.keys() == with_bar.keys() and all(torch.equal(plain[k], with_bar[k]) for k in plain)


def test_load_checkpoint_dispatches_directories_here(tiny_qwen2_dir: str) -> None:
    ckpt = load_checkpoint(tiny_qwen2_dir)
    assert ckpt.format == "safetensors" and ckpt.path == tiny_qwen2_dir
    direct = load_safetensors_dir(tiny_qwen2_dir).weights
    assert ckpt.weights.keys() == direct.keys()


# --- errors name the culprit ----------------------------------------------------------------------------------


def test_truncated_weights_file(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    weights_file = path / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, weights_file)


def test_file_cut_inside_the_header(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    weights_file = path / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:20])
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, weights_file)


def test_garbage_header(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    weights_file = path / "model.safetensors"
    data = weights_file.read_bytes()
    garbage = b"this is not json"
    weights_file.write_bytes(len(garbage).to_bytes(8, "little") + garbage + data[8 + len(garbage) :])
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, weights_file)


def test_missing_shard(tiny_llama_sharded_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_sharded_dir, tmp_path / "m")
    shard = path / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, shard)


def test_index_lists_a_tensor_its_shard_lacks(tiny_llama_sharded_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_sharded_dir, tmp_path / "m")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, path / "model-00001-of-00002.safetensors", "model.layers.9.mlp.up_proj.weight")


def test_index_without_weight_map(tiny_llama_sharded_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_sharded_dir, tmp_path / "m")
    index_file = path / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, index_file)


def test_duplicate_tensor_across_unindexed_files(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "model.safetensors").rename(path / "a.safetensors")
    save_file({"model.norm.weight": torch.ones(64)}, str(path / "b.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, path / "b.safetensors", "model.norm.weight")


def test_no_weight_files(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, path, "safetensors")


def test_missing_config(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, path / "config.json")


@pytest.mark.parametrize("content", ['{"hidden_size": 64,', "[1, 2]", "\xff\xfe"])
def test_invalid_config(content: str, tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, path / "config.json")


def test_missing_tokenizer(tiny_llama_dir: str, tmp_path: Path) -> None:
    path = _copy(tiny_llama_dir, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(path))
    _assert_names(info, "tokenizer.json")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_safetensors_dir(str(tmp_path / "nowhere"))
    _assert_names(info, tmp_path / "nowhere")
