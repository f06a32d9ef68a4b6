"""Tool-call parsing shared by every format: the boundary types, the parser interface, and one incremental
algorithm behind both whole outputs (``ToolParser.parse``) and streams (``ToolParser.stream``).

A format names the markers that open a tool-call region and reads a region by recursive descent over a
``RegionReader``, whose methods are generators: out of text they suspend, and resume when more arrives. A
stream so costs O(output) however it is split, and ``parse`` is the same code fed everything at once.
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

import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass, field
from typing import ClassVar


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


class BrokenRegion(Exception):
    """The region's text cannot become a valid region (or the output ended inside it)."""


@dataclass
class RegionCall:
    """A call as far as its region has been read."""

    name: str | None = None
    parts: list[str] = field(default_factory=list)  # canonical argument text: appended to, never revised
    has_args: bool = False
    unknown: bool = False  # names a tool outside tool_names: dropped


Region = Generator[None, None, None]
_MAX_DEPTH = 64  # JSON nesting; deeper is treated as malformed rather than risking RecursionError
_WS_RUN = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_PLAIN_RUN = re.compile(r'[^"\\]+')
_NUMBER_RUN = re.compile(r"[-+0-9.eE]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_LOW_SURROGATE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_KEEP_READ_TEXT = 4096  # read text a streamed region may keep before it is dropped (see drop_read_text)
_ARGUMENT_KEYS = ("arguments", "parameters")  # "parameters": Llama 3's spelling


def _encode(text: str) -> str:
    """``text`` as the inside of a JSON string, escaped as json.dumps(ensure_ascii=False) does."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False)[1:-1])


class RegionReader:
    """Reads one region's text left to right for a format's ``_region`` generator.

    Methods that need text are generators (``yield from reader.x()``): while the text runs out and more may
    come they suspend; once ``final`` is set, running out raises ``BrokenRegion``. Methods that look for an
    optional literal (``accept``) or the end (``at_end``) answer False / True at the end instead.
    """

    def __init__(self, text: str, final: bool, tool_names: frozenset[str] | None) -> None:
        self.text = text
        self.pos = 0
        self.final = final
        self.tool_names = tool_names
        self.live: list[RegionCall] = []  # the named calls of known tools: what gets sent
        self._pinned = 0  # accepts pending: each may rewind to where it began, so the text must stay

    def _wait(self, n: int = 1) -> Iterator[None]:
        while len(self.text) - self.pos < n and not self.final:
            yield

    def _need(self, n: int = 1) -> Iterator[None]:
        yield from self._wait(n)
        if len(self.text) - self.pos < n:
            raise BrokenRegion

    def skip_ws(self) -> Iterator[None]:
        while True:
            self.pos = _WS_RUN.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.final:
                return
            yield

    def at_end(self) -> Generator[None, None, bool]:
        """Whether only whitespace is left of the output (consumed if so)."""
        yield from self.skip_ws()
        return self.pos >= len(self.text)

    def peek(self) -> Generator[None, None, str]:
        """The next non-whitespace character, not consumed."""
        yield from self.skip_ws()
        yield from self._need()
        return self.text[self.pos]

    def accept(self, literal: str) -> Generator[None, None, bool]:
        """Consume ``literal`` (after optional whitespace) if it comes next; otherwise consume nothing."""
        start = self.pos
        self._pinned += 1
        try:
            yield from self.skip_ws()
            while True:
                ahead = self.text[self.pos : self.pos + len(literal)]
                if ahead == literal:
                    self.pos += len(literal)
                    return True
                if not literal.startswith(ahead) or self.final:
                    self.pos = start
                    return False
                yield
        finally:
            self._pinned -= 1

    def expect(self, literal: str) -> Iterator[None]:
        if not (yield from self.accept(literal)):
            raise BrokenRegion

    def until(self, stops: tuple[str, ...], limit: int = 128) -> Generator[None, None, tuple[str, str]]:
        """The text up to the first of ``stops`` (which stays unread) and that stop; names are short, so
        more than ``limit`` characters without a stop means this is no region."""
        while True:
            window = self.text[self.pos : self.pos + limit + max(map(len, stops))]
            if hits := [(i, s) for s in stops if (i := window.find(s)) >= 0]:
                i, stop = min(hits)
                self.pos += i
                return window[:i], stop
            if self.final or len(window) < len(self.text) - self.pos:
                raise BrokenRegion
            yield

    def json_string(self, out: list[str]) -> Generator[None, None, str]:
        """A JSON string: its value is returned, its canonical text appended to ``out`` as it is read."""
        if (yield from self.peek()) != '"':
            raise BrokenRegion
        self.pos += 1
        out.append('"')
        value: list[str] = []
        while True:
            yield from self._need()
            if run := _PLAIN_RUN.match(self.text, self.pos):
                value.append(run.group())
                out.append(_encode(run.group()))
                self.pos = run.end()
            elif self.text[self.pos] == '"':
                self.pos += 1
                out.append('"')
                return "".join(value)
            else:
                char = yield from self._escape()
                value.append(char)
                out.append(_encode(char))

    def _escape(self) -> Generator[None, None, str]:
        yield from self._need(2)
        kind = self.text[self.pos + 1]
        if kind in _ESCAPES:
            self.pos += 2
            return _ESCAPES[kind]
        yield from self._need(6)
        if kind != "u" or not _HEX4.fullmatch(self.text, self.pos + 2, self.pos + 6):
            raise BrokenRegion
        code = int(self.text[self.pos + 2 : self.pos + 6], 16)
        self.pos += 6
        if 0xD800 <= code < 0xDC00:  # a high surrogate pairs with a following low one, as in json.loads
            yield from self._wait(6)
            if _LOW_SURROGATE.match(self.text, self.pos):
                low = int(self.text[self.pos + 2 : self.pos + 6], 16)
                self.pos += 6
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
        return chr(code)

    def json_value(self, out: list[str], depth: int = 0) -> Iterator[None]:
        """One JSON value, its canonical text appended to ``out`` token by token as each token completes."""
        c = yield from self.peek()
        if c in "{[":
            if depth >= _MAX_DEPTH:
                raise BrokenRegion
            close = "}" if c == "{" else "]"
            self.pos += 1
            out.append(c)
            if not (yield from self.accept(close)):
                while True:
                    if c == "{":
                        yield from self.json_string(out)
                        yield from self.expect(":")
                        out.append(": ")
                    yield from self.json_value(out, depth + 1)
                    if not (yield from self.accept(",")):
                        break
                    out.append(", ")
                yield from self.expect(close)
            out.append(close)
        elif c == '"':
            yield from self.json_string(out)
        elif c in "-0123456789":
            # A number is complete only once something follows it: "1" may yet become "12".
            while (end := _NUMBER_RUN.match(self.text, self.pos).end()) == len(self.text) and not self.final:
                yield
            if not _NUMBER.fullmatch(self.text, self.pos, end):
                raise BrokenRegion
            out.append(self.text[self.pos : end])
            self.pos = end
        else:
            literal = {"t": "true", "f": "false", "n": "null"}.get(c)
            if literal is None:
                raise BrokenRegion
            yield from self.expect(literal)
            out.append(literal)

    def drop_read_text(self) -> None:
        """Forget the text already read, so that appending to a long region stays cheap; only for a region
        whose text can no longer become content (a call of it was sent) and while nothing may rewind."""
        if not self._pinned and self.pos > _KEEP_READ_TEXT:
            self.text, self.pos = self.text[self.pos :], 0

    def set_name(self, call: RegionCall, name: str) -> None:
        if not name:
            raise BrokenRegion
        if self.tool_names is not None and name not in self.tool_names:
            if not self.live:
                raise BrokenRegion  # the region opens with it: leave the model's text as content
            call.unknown = True
        call.name = name
        if not call.unknown:
            self.live.append(call)

    def arguments(self, call: RegionCall) -> Iterator[None]:
        """A call's arguments: a JSON object, streamed into ``call.parts``; or such an object inside a JSON
        string (OpenAI's wire form, which some fine-tunes copy), taken whole once the string ends."""
        call.has_args = True
        if (yield from self.peek()) == '"':
            inner = RegionReader((yield from self.json_string([])), True, None)
            parts: list[str] = []
            for _ in inner.arguments_object(parts):  # final: never suspends
                pass
            if inner.pos != len(inner.text.rstrip(" \t\n\r")):
                raise BrokenRegion
            call.parts.extend(parts)
        else:
            yield from self.arguments_object(call.parts)

    def arguments_object(self, out: list[str]) -> Iterator[None]:
        if (yield from self.peek()) != "{":
            raise BrokenRegion
        yield from self.json_value(out)

    def call_object(self, *, args_required: bool = False) -> Iterator[None]:
        """A ``{"name": ..., "arguments": {...}}`` object; other keys are read and ignored (Mistral Nemo adds
        ``"id"``, Llama 3.2 sometimes ``"type"``)."""
        call, name = RegionCall(), None
        yield from self.expect("{")
        if not (yield from self.accept("}")):
            while True:
                key = yield from self.json_string([])
                yield from self.expect(":")
                if key == "name" and name is None:
                    name = yield from self.json_string([])
                    if not args_required or call.has_args:
                        self.set_name(call, name)
                elif key in _ARGUMENT_KEYS and not call.has_args:
                    if name is not None and call.name is None:
                        # With args_required, the call is named (and so streamed) only once its arguments
                        # begin: a JSON answer like {"name": "Alice", "age": 30} is then never sent as a call.
                        self.set_name(call, name)
                    yield from self.arguments(call)
                else:
                    yield from self.json_value([])
                if not (yield from self.accept(",")):
                    break
            yield from self.expect("}")
        if name is None or (args_required and not call.has_args):
            raise BrokenRegion
        if call.name is None:
            self.set_name(call, name)
        if not call.has_args:
            call.parts.append("{}")


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
