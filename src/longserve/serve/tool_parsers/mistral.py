"""Mistral tool calls, two forms after the ``[TOOL_CALLS]`` special token:

- tokenizer v3 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct-v0.1, Mistral-Nemo):
  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, Nemo adding an ``"id"`` key;
- tokenizer v11+ (Mistral-Small-3.1/3.2, Mistral-Large-2411, Devstral, Magistral):
  ``[TOOL_CALLS]name[ARGS]{...}``, one segment per call, v13 inserting ``[CALL_ID]id`` before ``[ARGS]``.

``[TOOL_CALLS]``, ``[ARGS]`` and ``[CALL_ID]`` are special tokens: the server must detokenize with
skip_special_tokens=False. (Without ``[ARGS]`` the v11 form still parses: ``name{...}``.)
"""

from __future__ import annotations

from longserve.serve.tool_parsers.base import Region, RegionCall, RegionReader, ToolParser

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True
    markers = (TOOL_CALLS,)

    def _region(self, reader: RegionReader) -> Region:
        yield from reader.expect(TOOL_CALLS)
        first = yield from reader.peek()
        if first == "[":  # v3: a JSON array of calls
            reader.pos += 1
            if not (yield from reader.accept("]")):
                while True:
                    yield from reader.call_object()
                    if not (yield from reader.accept(",")):
                        break
                yield from reader.expect("]")
        elif first == "{":  # a lone call object, as some fine-tunes write it
            yield from reader.call_object()
        else:  # v11+: name, optionally [CALL_ID]id, [ARGS], then the arguments object
            name, stop = yield from reader.until((ARGS, CALL_ID, "{"))
            call = RegionCall()
            reader.set_name(call, name.strip())
            if stop == CALL_ID:
                reader.pos += len(CALL_ID)
                yield from reader.until((ARGS,))  # the model's own call id: ours replaces it
            yield from reader.accept(ARGS)
            yield from reader.arguments(call)
