"""Tool-call parsers: turn a model's free text into OpenAI-shaped tool calls, for a whole output
(``parser.parse(text)``) or incrementally while streaming (``parser.stream()``, then ``feed``/``finish``).

One module per output format; ``base`` holds the shared types and the one incremental algorithm:

- ``hermes``: ``<tool_call>{...}</tool_call>`` (Hermes 2 Pro / 3, Qwen2.5, QwQ, Qwen3);
- ``llama3_json``: ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>`` (Llama 3.1+);
- ``mistral``: ``[TOOL_CALLS][...]`` and ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral v0.3 to v13 tokenizers);
- ``deepseek_v3``: ``<｜tool▁calls▁begin｜>...`` (DeepSeek-V3, R1, V3.1).

A parser whose ``needs_special_tokens`` is True sees its markers only if the output is detokenized with
skip_special_tokens=False.
"""

from __future__ import annotations

from longserve.serve.tool_parsers.base import (
    ParsedOutput,
    StreamDelta,
    StreamingParse,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    make_tool_call_id,
)
from longserve.serve.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from longserve.serve.tool_parsers.hermes import HermesToolParser
from longserve.serve.tool_parsers.llama3_json import Llama3JsonToolParser
from longserve.serve.tool_parsers.mistral import MistralToolParser

__all__ = [
    "ParsedOutput",
    "StreamDelta",
    "StreamingParse",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "detect_tool_parser",
    "get_tool_parser",
    "make_tool_call_id",
    "tool_parser_names",
]


def _parsers() -> dict[str, type[ToolParser]]:
    parsers: tuple[type[ToolParser], ...] = (
        HermesToolParser,
        Llama3JsonToolParser,
        MistralToolParser,
        DeepSeekV3ToolParser,
    )
    return {p.name: p for p in parsers}


def tool_parser_names() -> list[str]:
    return sorted(_parsers())


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _parsers()[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(tool_parser_names())}") from None


def detect_tool_parser(chat_template: str | None, architecture: str | None) -> str | None:
    """The parser for a model, from the tool-call syntax its chat template teaches, else from its
    architecture (config.json's ``architectures[0]``); None if neither says."""
    template = chat_template or ""
    # Most specific markers first: a Llama fine-tune trained on Hermes calls has both <tool_call> and
    # <|eot_id|> in its template, and the calls look like Hermes's.
    if "<｜tool▁calls▁begin｜>" in template or "<｜tool▁call▁begin｜>" in template:
        return "deepseek_v3"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("<|eot_id|>" in template and '"parameters"' in template):
        return "llama3_json"
    arch = (architecture or "").lower()
    for prefix, name in (
        ("deepseekv3", "deepseek_v3"),
        ("qwen", "hermes"),
        ("mistral", "mistral"),
        ("mixtral", "mistral"),
        ("llama", "llama3_json"),
    ):
        if arch.startswith(prefix):
            return name
    return None
