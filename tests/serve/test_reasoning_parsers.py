"""Reasoning parsers: whole outputs split into reasoning and answer, and streams split at every possible
point (tags across tokens) give the same pieces; the prompt decides whether the output starts inside."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from longserve.serve.reasoning_parsers import (
    ReasoningSplitter,
    detect_reasoning_parser,
    get_reasoning_parser,
)

THINK = get_reasoning_parser("qwen3")


@pytest.mark.parametrize(
    ("prompt", "output", "reasoning", "content"),
    [
        ("", "<think>plan a</think>\n\nAnswer.", "plan a", "Answer."),
        ("", "  <think>x</think>y", "x", "y"),
        ("", "Just an answer", None, "Just an answer"),
        ("", "<thinking is fun", None, "<thinking is fun"),
        ("<|im_start|>assistant\n<think>\n", "steps</think>done", "steps", "done"),
        ("<|im_start|>assistant\n<think>\n", "never closed", "never closed", ""),
        ("<think>\n\n</think>\n\n", "no thinking here", None, "no thinking here"),  # enable_thinking off
        ("", "<think></think>", "", ""),
    ],
)
def test_whole_outputs_split(prompt, output, reasoning, content):
    assert ReasoningSplitter(THINK, prompt).parse(output) == (reasoning, content)


@given(
    st.text(alphabet="ab </>thinkTHIN[]\n", max_size=40),
    st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    st.booleans(),
)
def test_any_split_of_a_stream_gives_the_whole_outputs_pieces(output, cuts, opened):
    prompt = "<think>" if opened else ""
    want = ReasoningSplitter(THINK, prompt).parse(output)
    splitter, reasoning, content = ReasoningSplitter(THINK, prompt), "", ""
    points = sorted({min(c, len(output)) for c in cuts})
    for piece in (output[a:b] for a, b in zip([0, *points], [*points, len(output)], strict=True)):
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    assert (reasoning + r if splitter.reasoned else None, content + c) == want


def test_streamed_pieces_never_show_part_of_a_tag():
    splitter = ReasoningSplitter(get_reasoning_parser("mistral"))
    pieces = [splitter.feed(t) for t in ["[", "THI", "NK]", "mull", "[/", "TH", "INK]", " yes"]]
    assert pieces == [("", ""), ("", ""), ("", ""), ("mull", ""), ("", ""), ("", ""), ("", ""), ("", "yes")]


def test_templates_name_their_format():
    assert detect_reasoning_parser("{{ '<｜Assistant｜><think>\\n' }}...</think>") == "deepseek_r1"
    assert detect_reasoning_parser("<|im_start|>assistant\\n<think>\\n\\n</think>") == "qwen3"
    assert detect_reasoning_parser("[THINK]") == "mistral"
    assert detect_reasoning_parser("<|im_start|>") is None and detect_reasoning_parser(None) is None
    with pytest.raises(ValueError, match="known"):
        get_reasoning_parser("nope")
