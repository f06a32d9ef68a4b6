"""One choice's text split into reasoning and answer, incrementally: a tag split across tokens is held back
until it is whole, so every streamed piece is final, and the pieces concatenate to ``parse()``'s result."""

from __future__ import annotations

from dataclasses import dataclass

_BEFORE, _INSIDE, _AFTER = "before", "inside", "after"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str  # the tag that opens the reasoning
    end: str  # the tag that closes it


class ReasoningSplitter:
    """``feed`` pieces of one output (then ``finish``), or ``parse`` it whole: (reasoning, content) pieces.

    The answer's leading whitespace after the closing tag is dropped (the model's separator)."""

    def __init__(self, fmt: ReasoningFormat, prompt: str = "") -> None:
        self.fmt = fmt
        self._state = _INSIDE if prompt.rstrip().endswith(fmt.start) else _BEFORE
        self.reasoned = self._state == _INSIDE  # the output has a reasoning part
        self._held = ""  # text not given out yet: a possible tag, or leading whitespace
        self._strip = False  # the answer has just begun: drop its leading whitespace

    def parse(self, text: str) -> tuple[str | None, str]:
        """The reasoning (None if the output has none) and the answer of a whole output."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.finish()
        return (reasoning + more_reasoning if self.reasoned else None), content + more_content

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and answer this piece completes (either may be empty)."""
        self._held += text
        reasoning = ""
        start, end_tag = self.fmt.start, self.fmt.end
        if self._state == _BEFORE:
            lead = self._held.lstrip()
            if lead.startswith(start):
                self._held, self._state, self.reasoned = lead[len(start) :], _INSIDE, True
            elif start.startswith(lead):
                return "", ""  # only whitespace yet, or the beginning of the opening tag
            else:
                self._state = _AFTER
        if self._state == _INSIDE:
            end = self._held.find(end_tag)
            if end < 0:
                cut = len(self._held) - _partial_tag(self._held, end_tag)
                reasoning, self._held = self._held[:cut], self._held[cut:]
                return reasoning, ""
            reasoning, self._held = self._held[:end], self._held[end + len(end_tag) :]
            self._state, self._strip = _AFTER, True
        content, self._held = self._held, ""
        if self._strip:
            content = content.lstrip()
            self._strip = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back once the output has ended."""
        held, self._held = self._held, ""
        return (held, "") if self._state == _INSIDE else ("", held)


def _partial_tag(text: str, tag: str) -> int:
    """How many of ``text``'s last characters could begin ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
