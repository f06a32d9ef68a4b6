"""The incremental reader the tool-call formats parse with: ``RegionReader`` reads one tool-call region left to
right through generator methods that suspend when the text runs out and resume when more arrives, re-serialising
JSON arguments as canonical text (see ``base.py``'s docstring for what canonical means).
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field


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
