"""Tokenizer: text <-> token ids and chat prompts, built from a HF model directory or from GGUF metadata."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from longserve.loading.chat_template import ChatTemplate
from longserve.loading.errors import ModelLoadError
from longserve.loading.spm_tokenizer import sentencepiece_bpe

logger = logging.getLogger(__name__)

# Special tokens that end a turn or a document, as llama.cpp's end-of-generation list names them.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<EOT>",
)

# llama.cpp's `tokenizer.ggml.token_type` values (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes, by `tokenizer.ggml.pre` (the same ones the models' tokenizer.json files use).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"})
# StarCoder-style: every digit is its own piece, then the GPT-2 regex (SmolLM's tokenizer.json does this).
_DIGITS_PRES = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"})
_LLAMA3_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"})
_QWEN2_PRES = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})


class TokenizerSpec(msgspec.Struct, array_like=True):
    """A ``Tokenizer`` as data: what the engine core hands its client, and a worker its front ends."""

    tokenizer_json: str  # the ``tokenizers`` JSON, post-processor included (GGUF tokenizers too)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special tokens and chat template.

    ``encode`` adds BOS exactly when the model asks for it (the backend's post-processor says so; a GGUF's
    ``add_bos_token`` or a tokenizer_config's explicit ``add_bos_token`` installs one that does).
    ``vocab_size`` counts the tokenizer's tokens, added ones included; a model's embedding may have more rows.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        self._compiled_template: ChatTemplate | None = None
        # "add_bos_token": false with no BOS token at all asks nothing of the post-processor: tokenizer.json's
        # stays (Qwen3-Embedding's appends <|endoftext|>, the token its last-token pooling reads).
        nothing_to_change = not add_bos_token and not add_eos_token and bos_token_id is None
        if add_bos_token is not None and not nothing_to_change:
            _set_post_processor(backend, bos_token_id if add_bos_token else None, eos_token_id, add_eos_token)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos = {eos_token_id} if eos_token_id is not None else set()
        self.eos_token_ids: frozenset[int] = frozenset(eos | set(extra_eos_token_ids))
        listed = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        named = {bos_token_id, eos_token_id, pad_token_id, unk_token_id} - {None}
        self.all_special_ids: frozenset[int] = frozenset(listed | named)

    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(
            self.backend.to_str(),
            self.bos_token_id,
            self.eos_token_id,
            self.pad_token_id,
            self.unk_token_id,
            sorted(self.eos_token_ids),
            self.chat_template,
        )

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        return cls(
            tokenizers.Tokenizer.from_str(spec.tokenizer_json),  # its post-processor already adds BOS/EOS
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=spec.pad_token_id,
            unk_token_id=spec.unk_token_id,
            extra_eos_token_ids=spec.eos_token_ids,
            chat_template=spec.chat_template,
        )

    # -- text <-> ids ---------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- chat -----------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation; ``kwargs`` (``tools``, ``enable_thinking``, ...) reach the template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if self._compiled_template is None:
            self._compiled_template = ChatTemplate(self.chat_template)
        special = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "pad_token": self._token_text(self.pad_token_id),
            "unk_token": self._token_text(self.unk_token_id),
        }
        return self._compiled_template.render(
            messages, add_generation_prompt=add_generation_prompt, special_tokens=special, **kwargs
        )

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a HF model directory: tokenizer.json (required), tokenizer_config.json, generation_config.json,
        chat_template.jinja / chat_template.json."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ModelLoadError(f"{tokenizer_file} not found (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise ModelLoadError(f"{tokenizer_file}: cannot be read as a tokenizer: {e}") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        generation = _read_json(os.path.join(path, "generation_config.json"))

        def special_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        eos_token_id = special_id("eos_token")
        generation_eos = generation.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or ())
        if eos_token_id is None and generation_eos:
            eos_token_id = generation_eos[0]
        chat_template = _hf_chat_template(path, config)
        extra = generation_eos + _end_of_turn_ids(backend, only_in=chat_template or "")
        add_bos = config.get("add_bos_token")
        return cls(
            backend,
            bos_token_id=special_id("bos_token"),
            eos_token_id=eos_token_id,
            pad_token_id=special_id("pad_token"),
            unk_token_id=special_id("unk_token"),
            extra_eos_token_ids=extra,
            chat_template=chat_template,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From a GGUF file's ``tokenizer.*`` metadata (key -> plain Python value, arrays as lists)."""
        model = metadata.get("tokenizer.ggml.model")
        pre = metadata.get("tokenizer.ggml.pre")
        embedded_json = metadata.get("tokenizer.huggingface.json")
        if isinstance(embedded_json, str):
            try:
                backend = tokenizers.Tokenizer.from_str(embedded_json)
            except Exception as e:
                raise ModelLoadError(f"GGUF tokenizer.huggingface.json cannot be read: {e}") from e
        elif model == "gpt2":
            backend = _byte_level_bpe(
                metadata.get("tokenizer.ggml.tokens") or [],
                metadata.get("tokenizer.ggml.merges") or [],
                metadata.get("tokenizer.ggml.token_type") or [],
                pre,
            )
        elif model == "llama":
            unk = metadata.get("tokenizer.ggml.unknown_token_id")
            backend = sentencepiece_bpe(
                metadata.get("tokenizer.ggml.tokens") or [],
                metadata.get("tokenizer.ggml.scores") or [],
                metadata.get("tokenizer.ggml.token_type") or [],
                int(unk) if unk is not None else None,
                add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
            )
        else:
            raise ModelLoadError(
                f"unsupported GGUF tokenizer model {model!r} "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )

        def token_id(name: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{name}_token_id")
            return int(value) if value is not None else None

        extra = [i for i in (token_id("eot"), token_id("eom")) if i is not None]
        # As llama.cpp does: any end-of-turn-looking special token ends generation, in the template or not.
        extra += _end_of_turn_ids(backend, only_in=None)
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default: SentencePiece and Llama-3-style vocabularies want BOS
            add_bos = model == "llama" or pre in _LLAMA3_PRES
        return cls(
            backend,
            bos_token_id=token_id("bos"),
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("padding"),
            unk_token_id=token_id("unknown"),
            extra_eos_token_ids=extra,
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos_token=bool(add_bos),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        )


def _byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str | None
) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 family) from llama.cpp's vocabulary arrays."""
    if not tokens:
        raise ModelLoadError("GGUF has no tokenizer.ggml.tokens")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_to_char = _bytes_to_unicode()
    types = list(token_types) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (_CONTROL, _USER_DEFINED):
            # Stored as plain text and matched whole in the input, before any byte-level mapping.
            added.append(AddedToken(token, normalized=False, special=kind == _CONTROL))
        elif not set(token) <= alphabet:
            # A normal token written as raw text: respell it in the byte alphabet the merges use.
            token = "".join(byte_to_char[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        logger.warning(
            "GGUF vocabulary has %d duplicate token strings; keeping the first of each",
            len(tokens) - len(vocab),
        )
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        pairs.append((left, right))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in _LLAMA3_PRES)
    except Exception as e:
        raise ModelLoadError(f"GGUF vocabulary and merges do not form a valid BPE model: {e}") from e
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split rule the vocabulary's merges were learned with, named by ``tokenizer.ggml.pre``."""

    def regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _LLAMA3_PRES:
        return regex_then_bytes(_LLAMA3_SPLIT)
    if pre in _QWEN2_PRES:
        return regex_then_bytes(_QWEN2_SPLIT)
    if pre is not None and pre not in _GPT2_PRES:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting text with the GPT-2 regex", pre)
    return gpt2


def _set_post_processor(
    backend: tokenizers.Tokenizer, bos_token_id: int | None, eos_token_id: int | None, add_eos: bool
) -> None:
    """Make ``encode(..., add_special_tokens=True)`` add exactly BOS (if given) and EOS (if ``add_eos``)."""
    specials = []
    before, after = [], []
    if bos_token_id is not None:
        bos = backend.id_to_token(bos_token_id)
        before, specials = [bos], [(bos, bos_token_id)]
    if add_eos and eos_token_id is not None:
        eos = backend.id_to_token(eos_token_id)
        after = [eos]
        specials.append((eos, eos_token_id))
    backend.post_processor = processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *before, "$B", *after],
        special_tokens=specials,
    )


def _end_of_turn_ids(backend: tokenizers.Tokenizer, only_in: str | None) -> list[int]:
    """Ids of special tokens named like end-of-turn markers (restricted to those the template writes, if given)."""
    special = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return [
        special[name]
        for name in _END_OF_TURN_TOKENS
        if name in special and (only_in is None or name in only_in)
    ]


def _hf_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
    """The chat template: chat_template.jinja, else chat_template.json, else tokenizer_config.json's."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: bytes that print stay, the rest move to U+0100 and up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table
