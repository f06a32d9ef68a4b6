"""Hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.

Emitted by NousResearch Hermes 2 Pro / Hermes 3, Qwen2.5 (and Qwen2.5-Coder), QwQ-32B and Qwen3, whose
``<think>...</think>`` before the calls stays in content. ``<tool_call>`` is an added but not special token
in these tokenizers, so skip_special_tokens keeps it.
"""

from __future__ import annotations

from longserve.serve.tool_parsers.base import Region, RegionReader, ToolParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    needs_special_tokens = False
    markers = (OPEN,)

    def _region(self, reader: RegionReader) -> Region:
        yield from reader.expect(OPEN)
        yield from reader.call_object()
        # An output that ends right after the JSON (max_tokens, or a stop string on the closing tag) still
        # holds a complete call.
        if not (yield from reader.at_end()):
            yield from reader.expect(CLOSE)
