"""Tool-call parsing shared by every format: the boundary types, the parser interface, and one incremental
algorithm behind both whole outputs (``ToolParser.parse``) and streams (``ToolParser.stream``).

A format names the markers that open a tool-call region and reads a region by recursive descent over a
``RegionReader`` (region_reader.py), whose methods are generators: out of text they suspend, and resume when
more arrives. A stream so costs O(output) however it is split, and ``parse`` is the same code fed everything
at once.
Arguments are re-serialised as they are read and only appended to, so every streamed fragment is final.
Canonical arguments are ``json.dumps(json.loads(args), ensure_ascii=False)``'s text, except that numbers keep
their spelling (``1e5``), duplicate keys stay, lone surrogates stay escaped (the text always encodes as UTF-8)
and raw control characters in strings (literal newlines in code arguments) are accepted, and escaped.

A stream against ``parse()`` of the same full text:
- content: the pieces concatenate to ``parse().content`` (``""`` for None): the text outside regions with
  the output's leading and trailing whitespace removed. Whitespace is held until non-whitespace follows, and
  so is a tail that could begin a marker: no partial ``<tool_c`` is ever sent.
- calls: the same names and arguments in the same order; a call's first delta carries id and name (sent as
  soon as the name is read), later ones argument fragments whose concatenation is ``parse()``'s arguments.
- except for a region that breaks after one of its calls was sent (output cut off mid-call, bad syntax
  after the name): the sent calls stand, arguments possibly incomplete, and the rest of the output is
  dropped, where ``parse()`` leaves the region as content. ``stream(defer_calls=True)`` sends calls only once
  their region is complete, and then always matches ``parse()``.

Unknown tools (``tool_names`` given): a region whose first call names one stays content (the model's text);
a later call of a multi-call region (Mistral array, DeepSeek block, Llama ``;`` list) naming one is dropped,
since the calls before it may already be sent.
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from longserve.serve.tool_parsers.region_reader import BrokenRegion, Region, RegionCall, RegionReader


def make_tool_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One complete call."""

    id: str
    name: str
    arguments: str  # a JSON object as text (canonical, see the module docstring)


@dataclass
class ParsedOutput:
    content: str | None  # text outside the tool calls, stripped; None if that leaves nothing
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """OpenAI's streaming shape: a call's first delta carries id and name, later ones argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser(ABC):
    """One model family's tool-call format. Subclasses set the class variables and write ``_region``."""

    name: ClassVar[str]
    # True when the markers are special tokens that skip_special_tokens would drop: the server must then
    # detokenize with skip_special_tokens=False for this parser to see them.
    needs_special_tokens: ClassVar[bool]
    markers: ClassVar[tuple[str, ...]]  # texts that open a tool-call region

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        # Any proper prefix of a marker, at the very end of the text (alternatives longest first).
        prefixes = sorted({m[:k] for m in self.markers for k in range(1, len(m))}, key=len, reverse=True)
        self._marker_tail = re.compile("(?:" + "|".join(map(re.escape, prefixes)) + r")\Z")
        self._longest_marker = max(map(len, self.markers))

    @abstractmethod
    def _region(self, reader: RegionReader) -> Region:
        """Read one region, from its opening marker on; raise ``BrokenRegion`` if it is none."""

    def _region_start(self, text: str, blank: bool) -> tuple[int, int] | None:
        """Where the first region opens in ``text``, and its marker's length (what becomes content if the
        region turns out broken). ``blank``: the output so far is whitespace only."""
        hits = [(i, len(m)) for m in self.markers if (i := text.find(m)) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a marker, so must wait for more text."""
        found = self._marker_tail.search(text, max(len(text) - self._longest_marker + 1, 0))
        return len(text) - found.start() if found else 0

    def parse(self, text: str) -> ParsedOutput:
        """A whole output: the same algorithm as a stream, fed everything, with calls taken per region."""
        stream = self.stream(defer_calls=True)
        deltas = [stream.feed(text), stream.finish()]
        content = "".join(d.content or "" for d in deltas)
        calls = [ToolCall(t.id or "", t.name or "", t.arguments) for d in deltas for t in d.tool_calls]
        return ParsedOutput(content or None, calls)

    def stream(self, *, defer_calls: bool = False) -> StreamingParse:
        """A fresh incremental parse for one choice (see the module docstring for ``defer_calls``)."""
        return StreamingParse(self, defer_calls=defer_calls)


class StreamingParse:
    """The incremental parse of one choice's output: ``feed`` each new piece of text, then ``finish``."""

    def __init__(self, parser: ToolParser, *, defer_calls: bool = False) -> None:
        self._parser = parser
        self._defer_calls = defer_calls
        self._text = ""  # undecided text: a tail of content held back, or the open region from its marker on
        self._reader: RegionReader | None = None
        self._region: Region | None = None
        self._marker = 0  # length of the open region's marker
        self._sent: list[list[int]] = []  # per streamed call of the open region: [index, parts sent]
        self._next_index = 0
        self._blank = True  # only whitespace so far (Llama's bare JSON calls must open the output)
        self._started = False  # some content was sent, so leading whitespace is over
        self._space = ""  # whitespace held back: content only if non-whitespace follows
        self._closed = False  # finished, or a streamed region broke

    def feed(self, delta_text: str) -> StreamDelta:
        if self._closed:
            return StreamDelta()
        self._text += delta_text
        return self._advance(final=False)

    def finish(self) -> StreamDelta:
        """End of output: decide everything held back (trailing whitespace is dropped)."""
        if self._closed:
            return StreamDelta()
        delta = self._advance(final=True)
        self._closed = True
        return delta

    def _advance(self, final: bool) -> StreamDelta:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while not self._closed:
            if self._region is None:
                found = self._parser._region_start(self._text, self._blank)
                if found is None:
                    cut = len(self._text) - (0 if final else self._parser._held(self._text))
                    self._content(self._text[:cut], content)
                    self._text = self._text[cut:]
                    break
                start, self._marker = found
                self._content(self._text[:start], content)
                self._text = self._text[start:]
                self._reader = RegionReader(self._text, final, self._parser.tool_names)
                self._region = self._parser._region(self._reader)
                self._sent = []
            reader = self._reader
            assert reader is not None
            reader.text, reader.final = self._text, final
            try:
                next(self._region)
                state = "broken" if final else "open"  # a reader never suspends once final; be safe anyway
            except StopIteration:
                state = "done" if reader.live else "broken"
            except BrokenRegion:
                state = "broken"
            if state == "broken":
                self._region = None
                if self._sent:  # calls already streamed cannot be taken back: stop here
                    self._closed, self._text = True, ""
                    break
                self._content(self._text[: self._marker], content)  # the marker is text after all
                self._text = self._text[self._marker :]
                continue
            if state == "done" or not self._defer_calls:
                self._send_calls(reader.live, calls)
            if state == "open":
                if self._sent:
                    reader.drop_read_text()
                    self._text = reader.text
                break
            self._text, self._region, self._blank = self._text[reader.pos :], None, False
        return StreamDelta("".join(content) or None, calls)

    def _content(self, piece: str, out: list[str]) -> None:
        if not piece:
            return
        self._blank = self._blank and not piece.strip()
        text = self._space + piece
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._space = text[len(body) :]
        if body:
            self._started = True
            out.append(body)

    def _send_calls(self, live: list[RegionCall], out: list[ToolCallDelta]) -> None:
        # A region reads its calls one after another: only the last call sent can still grow, and new ones.
        for i in range(max(len(self._sent) - 1, 0), len(live)):
            new = i == len(self._sent)
            if new:
                self._sent.append([self._next_index, 0])
                self._next_index += 1
            index, sent = self._sent[i]
            fragment = "".join(live[i].parts[sent:])
            self._sent[i][1] = len(live[i].parts)
            if new:
                out.append(ToolCallDelta(index, make_tool_call_id(), live[i].name, fragment))
            elif fragment:
                out.append(ToolCallDelta(index, arguments=fragment))
