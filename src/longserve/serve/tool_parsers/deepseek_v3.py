"""DeepSeek tool calls: a block of calls between ``<｜tool▁calls▁begin｜>`` and ``<｜tool▁calls▁end｜>``
(fullwidth bars U+FF5C and U+2581 "▁", not ASCII), each call in one of two layouts:

- DeepSeek-V3 / V3-0324 / R1-0528: ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\\n```json\\n{...}
  \\n```<｜tool▁call▁end｜>``;
- DeepSeek-V3.1 and later: ``<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``.

R1's ``<think>...</think>`` before the block stays in content. The markers are added tokens that some
exports flag special, so the server should detokenize with skip_special_tokens=False (harmless otherwise).
"""

from __future__ import annotations

from longserve.serve.tool_parsers.base import BrokenRegion, Region, RegionCall, RegionReader, ToolParser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    needs_special_tokens = True
    markers = (CALLS_BEGIN,)

    def _region(self, reader: RegionReader) -> Region:
        yield from reader.expect(CALLS_BEGIN)
        while not (yield from reader.accept(CALLS_END)):
            # An output cut off (or stopped) after complete calls keeps them.
            if reader.live and (yield from reader.at_end()):
                return
            yield from reader.expect(CALL_BEGIN)
            head, _ = yield from reader.until((SEP,))
            reader.pos += len(SEP)
            call = RegionCall()
            if (yield from reader.peek()) == "{":  # V3.1: the name came before the separator
                reader.set_name(call, head.strip())
                yield from reader.arguments(call)
            else:  # V3: a type ("function"), the name on its own line, then a fenced JSON object
                if head.strip() != "function":
                    raise BrokenRegion
                name, _ = yield from reader.until(("\n",))
                reader.set_name(call, name.strip())
                yield from reader.expect("```json")
                yield from reader.arguments(call)
                yield from reader.expect("```")
            yield from reader.expect(CALL_END)
