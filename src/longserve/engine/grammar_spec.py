"""A request's ``StructuredOutputParams`` as an llguidance grammar, and its check; torch-free, so the API
server can answer 400 for a bad schema before the request reaches a worker."""

from __future__ import annotations

import json
import unicodedata

import llguidance
from llguidance import LLMatcher

from longserve.engine.sampling_params import StructuredOutputParams

# llguidance's JSON options: compact separators as `json.dumps(separators=(",", ":"))` writes them. A model
# free to pick its whitespace can run away with newlines while the grammar stays satisfied.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_definition(spec: StructuredOutputParams) -> str:
    """The llguidance grammar for ``spec``; a spec that is not even well-formed raises ``ValueError``."""
    if spec.json is not None:
        try:
            schema = json.loads(spec.json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json: the schema is not valid JSON ({exc})") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("json: a JSON schema must be an object or a boolean")
        return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if spec.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.grammar_from("choice", json.dumps(spec.choice))
    assert spec.grammar is not None
    try:  # Lark passes through; GBNF (llama.cpp's, what vLLM's EBNF users write) is converted to Lark
        return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as exc:
        raise ValueError(f"grammar: {exc}") from None


def check_structured_output(spec: StructuredOutputParams) -> None:
    """Raise ``ValueError`` starting with the spec's field name if its grammar does not compile.

    Needs no tokenizer, so the API server can answer 400 before a request reaches a worker.
    """
    definition = grammar_definition(spec)
    _check_normalized(spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(definition)
    if is_error:
        raise ValueError(f"{spec.kind}: {messages[0] if messages else 'invalid grammar'}")


def _check_normalized(spec: StructuredOutputParams) -> None:
    """Refuse text that Unicode NFC normalization changes: llguidance builds its token masks from the
    normalized text but checks each chosen token against the literal bytes, so such a grammar would let the
    model pick a token the grammar then rejects."""
    if spec.json is not None:
        texts = [json.dumps(json.loads(spec.json), ensure_ascii=False)]
    else:
        texts = [t for t in (spec.regex, spec.grammar) if t is not None] + list(spec.choice or [])
    for text in texts:
        if unicodedata.is_normalized("NFC", text):
            continue
        odd = next(
            (c for c in text if unicodedata.normalize("NFC", c) != c or unicodedata.combining(c)), None
        )
        where = f" ({odd!r}, U+{ord(odd):04X})" if odd else ""
        raise ValueError(
            f"{spec.kind}: the text changes under Unicode NFC normalization{where}, which grammars do not "
            "support: send it NFC-normalized (composed accents, no compatibility characters)"
        )
