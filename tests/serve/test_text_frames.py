"""Pre-encoded SSE frames are byte for byte what encoding each chunk would give, whatever the text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from longserve.serve.openai_common import TextFrames, sse
from longserve.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)


def _chat(index: int, text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=text))
    return ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model='m/\u00e9"x', choices=[choice])


def _completion(index: int, text: str) -> CompletionResponse:
    return CompletionResponse(
        id="cmpl-1", created=1700000000, model="m", choices=[CompletionChoice(index=index, text=text)]
    )


@settings(max_examples=300, deadline=None)
@given(text=st.text(), index=st.integers(0, 3))
def test_spliced_frames_equal_encoded_chunks(text: str, index: int) -> None:
    for build in (_chat, _completion):
        assert TextFrames(build).frame(index, text) == sse(build(index, text))
