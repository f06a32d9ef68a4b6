"""Incremental detokenizer: token stream -> text deltas, never a partial UTF-8 character or stop string.

Two layers, one per hazard:
- Characters: only a short window of token ids is decoded each step (the prefix/read offsets of vLLM and TGI).
  Text from the window is released once complete; trailing U+FFFD from bytes of a character split across
  tokens is held back until later bytes finish it. Cost per token is O(window), independent of output length,
  and the window starts a few prompt tokens back so the first output token's leading space decodes as it
  would inside the full text.
- Stop strings: released text that could still be the start of a stop string is held back until the next
  characters either complete the stop string (generation ends there) or rule it out.

A caller that wants the text only at the end (the offline ``LLM``) passes ``stream_text=False``: without stop
strings nothing needs the text before then, so tokens only collect and ``flush`` decodes them in one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Prompt tokens decoded in front of the output: enough context for tokenizers whose decode of a lone token
# differs from its decode in context (leading-space markers, merges), few enough to stay cheap.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for the bytes of an unfinished UTF-8 character


class TokenDecoder(Protocol):
    """Anything that decodes token ids to text, like ``tokenizers.Tokenizer`` or the project's Tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class DetokenizerDelta:
    """Text released by one token."""

    text: str  # new text safe to emit now
    stop_string: str | None = None  # set when a stop string matched; generation must end


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, a delta per token."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        stream_text: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        # The window: ids from the prefix offset on. Ids before _read_offset decode to _prefix_text, text that
        # was already accounted for; _released counts characters of the window's decode already handed on.
        self._window = list(prompt_token_ids[max(len(prompt_token_ids) - _PROMPT_CONTEXT_TOKENS, 0) :])
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._released = len(self._prefix_text)
        self._held = ""  # released characters kept back because they may start a stop string
        self._output_text = ""
        self._stopped = False
        # Stop strings are matched as the text grows, so they need it per token whatever the caller wants.
        self._collect_only = not stream_text and not self._stop

    @property
    def output_text(self) -> str:
        """Everything emitted so far."""
        return self._output_text

    def add_token(self, token_id: int) -> DetokenizerDelta:
        """Feed one generated token; return the text it makes safe to emit."""
        if self._stopped:
            return DetokenizerDelta("")
        self._window.append(token_id)
        if self._collect_only:
            return DetokenizerDelta("")
        return self._filter_stop(self._release_complete_text(), final=False)

    def flush(self) -> str:
        """At finish (not by stop string): release everything held back, unfinished characters included."""
        if self._stopped:
            return ""
        text = self._decode(self._window)[self._released :]
        self._released += len(text)
        return self._filter_stop(text, final=True).text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _release_complete_text(self) -> str:
        text = self._decode(self._window)
        if text.endswith(_REPLACEMENT_CHAR):
            # The last character is unfinished; what precedes it is final (UTF-8 resynchronises at a
            # character boundary), so it can go out now. The window cannot move: its end is mid-character.
            complete = text.rstrip(_REPLACEMENT_CHAR)
            delta = complete[self._released :]
            self._released = max(self._released, len(complete))
            return delta
        delta = text[self._released :]
        if len(text) > len(self._prefix_text):
            # Clean end: slide the window so the next decode starts at the old read offset.
            self._window = self._window[self._read_offset :]
            self._read_offset = len(self._window)
            self._prefix_text = self._decode(self._window)
            self._released = len(self._prefix_text)
        return delta

    def _filter_stop(self, text: str, *, final: bool) -> DetokenizerDelta:
        if not self._stop:
            self._output_text += text
            return DetokenizerDelta(text)
        buffer = self._held + text
        match = _first_stop(buffer, self._stop)
        if match is not None:
            start, end, stop = match
            emit = buffer[: end if self._include_stop else start]
            self._held = ""
            self._stopped = True
            self._output_text += emit
            return DetokenizerDelta(emit, stop)
        keep = 0 if final else _partial_stop_length(buffer, self._stop)
        emit, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        self._output_text += emit
        return DetokenizerDelta(emit)


def _first_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """(start, end, stop) of the stop string that completes first in ``text``; ties go to the longer one.

    "Completes first" is the earliest end: streamed a character at a time, that is where generation stops.
    """
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if best is None or (end, start) < (best[1], best[0]):
            best = (start, end, stop)
    return best


def _partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
