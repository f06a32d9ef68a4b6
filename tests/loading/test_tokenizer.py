"""Tokenizer: parity with transformers on the default GGUF, GGUF vocab construction, HF directories."""

from __future__ import annotations

import json
import logging

import gguf
import pytest

from longserve.loading.errors import ModelLoadError
from longserve.loading.gguf_loader import load_gguf
from longserve.loading.tokenizer import Tokenizer

VARIED_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'll say we'd've won.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}\t// comment',
    "Emojis: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Ünïcödé àccents, ß, Ελληνικά, русский язык, العربية",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines\r\n  mixed \t \n end",
    "numbers 1234567890 12 3 4567 0.5e-10 1,000,000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token<|im_end|>",
    "a <|im_start|>b<|im_end|>c",
    "",
    " ",
    "\n",
    "x" * 300,
    "aaaa bbbb cccc dddd " * 20,
]


@pytest.fixture(scope="session")
def gguf_tokenizer(default_checkpoint) -> Tokenizer:
    return default_checkpoint.tokenizer


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_encode_matches_transformers(gguf_tokenizer, hf_gguf_tokenizer, text):
    for add_special in (True, False):
        expected = hf_gguf_tokenizer.encode(text, add_special_tokens=add_special)
        assert gguf_tokenizer.encode(text, add_special_tokens=add_special) == expected


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_decode_matches_transformers(gguf_tokenizer, hf_gguf_tokenizer, text):
    ids = hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert gguf_tokenizer.decode(ids, skip_special_tokens=skip) == hf_gguf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert gguf_tokenizer.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def _control_token_ids(path: str) -> set[int]:
    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()
    return {i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL}


def test_special_tokens_of_the_default_model(gguf_tokenizer, hf_gguf_tokenizer, default_gguf_path):
    tok = gguf_tokenizer
    assert tok.vocab_size == 49152 == len(hf_gguf_tokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.encode("<|im_start|>") == [1]  # matched whole, and no BOS added (add_bos_token is false)
    assert tok.eos_token_id in tok.eos_token_ids
    assert tok.token_to_id("<|endoftext|>") in tok.eos_token_ids
    assert tok.token_to_id("<|im_start|>") not in tok.eos_token_ids
    assert set(hf_gguf_tokenizer.all_special_ids) <= tok.all_special_ids
    assert tok.all_special_ids == _control_token_ids(default_gguf_path)
    assert tok.decode([1, 4093, 2]) == "user"  # specials skipped by default


def _tiny(write_gguf, **metadata) -> Tokenizer:
    return load_gguf(write_gguf({}, arch="qwen2", metadata=metadata)).tokenizer


def test_gguf_control_tokens_are_special(write_gguf):
    tok = _tiny(write_gguf)
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, tok.token_to_id("hello"), 2]
    assert tok.all_special_ids == {0, 1, 2}
    assert tok.decode(tok.encode("<|im_start|>hello")) == "hello"


def test_gguf_add_bos_token(write_gguf):
    with_bos = _tiny(write_gguf, **{"tokenizer.ggml.add_bos_token": True})
    without = _tiny(write_gguf)
    assert with_bos.encode("hello") == [1, with_bos.token_to_id("hello")]
    assert with_bos.encode("hello", add_special_tokens=False) == [with_bos.token_to_id("hello")]
    assert without.encode("hello") == [without.token_to_id("hello")]


def test_smollm_pre_tokenizer_splits_digits(write_gguf):
    # The tiny vocab can merge "12345" into "1234"+"5"; SmolLM's pre-tokenizer cuts every digit apart first.
    smollm = _tiny(write_gguf)
    gpt2 = _tiny(write_gguf, **{"tokenizer.ggml.pre": "gpt-2"})
    assert [smollm.id_to_token(i) for i in smollm.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert [gpt2.id_to_token(i) for i in gpt2.encode("12345")] == ["1234", "5"]


def test_llama3_pre_tokenizer_groups_three_digits(write_gguf):
    tok = _tiny(write_gguf, **{"tokenizer.ggml.pre": "llama-bpe"})
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == ["123", "45"]
    assert tok.decode(tok.encode(" hello world\n\n")) == " hello world\n\n"


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(write_gguf, caplog):
    with caplog.at_level(logging.WARNING):
        tok = _tiny(write_gguf, **{"tokenizer.ggml.pre": "brand-new-model"})
    assert "brand-new-model" in caplog.text
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == ["1234", "5"]


def test_gguf_end_of_turn_ids(write_gguf):
    tok = _tiny(write_gguf, **{"tokenizer.ggml.eot_token_id": 1})
    assert tok.eos_token_ids == {2, 1, 0}  # eos, the declared end-of-turn id, and <|endoftext|>


# -- Hugging Face directories ----------------------------------------------------------------------------------------


def _hf_dir(tmp_path, tok: Tokenizer, config: dict, **files) -> str:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (tmp_path / name.replace("__", ".")).write_text(content)
    return str(tmp_path)


def test_hf_dir_roundtrip(tmp_path, gguf_tokenizer):
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|im_end|>",
        "chat_template": gguf_tokenizer.chat_template,
    }
    generation = json.dumps({"eos_token_id": [2, 0]})
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, gguf_tokenizer, config, generation_config__json=generation))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == {0, 2}
    assert tok.vocab_size == gguf_tokenizer.vocab_size
    for text in VARIED_TEXTS:
        assert tok.encode(text) == gguf_tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == gguf_tokenizer.apply_chat_template(messages)


def test_hf_dir_saved_by_transformers(tmp_path, gguf_tokenizer, hf_gguf_tokenizer):
    hf_gguf_tokenizer.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.all_special_ids == gguf_tokenizer.all_special_ids
    for text in VARIED_TEXTS:
        assert tok.encode(text) == hf_gguf_tokenizer.encode(text)
    for messages in ([{"role": "user", "content": "Hi"}], [{"role": "system", "content": "S"}]):
        expected = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages) == expected


def test_hf_dir_template_sources_and_bos_flag(tmp_path, gguf_tokenizer):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": named,
    }
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, gguf_tokenizer, config))
    assert tok.chat_template == "DEFAULT"
    assert tok.encode("hi") == [1, *gguf_tokenizer.encode("hi")]
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "FROM JSON"}))
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "FROM JSON"
    (tmp_path / "chat_template.jinja").write_text("FROM JINJA")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "FROM JINJA"


def test_hf_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_hf_dir_with_broken_json(tmp_path, gguf_tokenizer):
    _hf_dir(tmp_path, gguf_tokenizer, {})
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(tmp_path)
