"""GGUF SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) tokenize as llama.cpp does on the same
file, and as transformers' GGUF loader does except for leading spaces: score-ranked merges, "▁" for spaces, byte
fallback, BOS by default."""

from __future__ import annotations

import os

import pytest

from longserve.loading.gguf_loader import load_gguf

PIECES = {  # piece -> score: the higher, the earlier it is merged
    "▁hello": -1.0, "▁world": -2.0, "ll": -3.0, "llo": -4.0, "▁he": -5.0, "▁h": -6.0, "or": -7.0,
    "▁w": -8.0, "▁wor": -9.0, "ld": -10.0, "12": -11.0, "123": -12.0,
    **{c: -20.0 - i for i, c in enumerate("▁helowrd123")},
    # "bc" outranks "ab": "abc" must merge b+c first (the order of merges matters only here)
    "ab": -30.0, "bc": -29.0, "a": -40.0, "b": -41.0, "c": -42.0,
}  # fmt: skip
TEXTS = [
    "hello world",
    "hello\nworld",
    "héllo wörld",
    "1234",
    "hello  world",
    "world hello hello",
    "x",
    "hello ",
]
# What llama.cpp's own llama-server (/tokenize) returned for this vocabulary, written to a complete model file.
# A leading space is where transformers' GGUF converter differs: its Metaspace skips the "▁" it would prepend.
LLAMA_CPP = {
    "hello world": [259, 260],
    " hello": [271, 259],
    "  hello": [271, 271, 259],
    "héllo wörld": [264, 198, 172, 262, 266, 198, 185, 277, 268],
    "hello  world": [259, 271, 260],
    "abc": [271, 284, 283],  # "▁", "a", "bc": the higher-scored merge first
    "cab abcab": [271, 286, 282, 271, 284, 283, 282],
}


def _spm_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(PIECES)
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + list(PIECES.values())
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": None,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": None,
    }


def test_sentencepiece_gguf_matches_transformers(write_gguf) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_gguf(metadata=_spm_metadata(), name="spm.gguf")
    ours = load_gguf(path).tokenizer
    directory, name = os.path.split(path)
    theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    for text, ids in LLAMA_CPP.items():
        assert ours.encode(text, add_special_tokens=False) == ids, text
    assert [ours.id_to_token(i) for i in ours.encode("hello world", add_special_tokens=False)] == [
        "▁hello",
        "▁world",
    ]
    assert ours.encode("hello")[0] == 1  # SentencePiece vocabularies get BOS unless the file says otherwise
    assert ours.decode(ours.encode("héllo wörld")) == "héllo wörld"  # é and ö went through byte tokens
