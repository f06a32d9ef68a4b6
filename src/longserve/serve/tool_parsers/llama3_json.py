"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: ``{"name": ..., "parameters": {...}}`` as the whole output, or
after ``<|python_tag|>``; several calls are separated by ``;``. Some checkpoints write ``"arguments"``.

The JSON form is what the Llama 3.1+ chat templates ask for with custom tools. ``<|python_tag|>`` is a
special token: with skip_special_tokens it vanishes, and bare JSON is then recognised only where it opens the
output. Text that is no such JSON (built-in tools' ``brave_search.call(...)`` included) stays content.
"""

from __future__ import annotations

from longserve.serve.tool_parsers.base import Region, RegionReader, ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True
    markers = (PYTHON_TAG,)

    def _region_start(self, text: str, blank: bool) -> tuple[int, int] | None:
        found = super()._region_start(text, blank)
        if blank:
            # Without the tag a call is recognised only as the start of the output: a "{" in the middle of
            # prose is far more likely to be an example than a call.
            rest = text.lstrip()
            at = len(text) - len(rest)
            if rest.startswith("{") and (found is None or at < found[0]):
                return at, 1
        return found

    def _region(self, reader: RegionReader) -> Region:
        yield from reader.accept(PYTHON_TAG)
        while True:
            # "parameters" is required: plain JSON answers ({"name": "Alice"}) must stay content.
            yield from reader.call_object(args_required=True)
            if not (yield from reader.accept(";")):
                return
            if (yield from reader.at_end()):  # a trailing ";" ends the list
                return
