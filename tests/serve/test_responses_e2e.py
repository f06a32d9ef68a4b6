"""POST /v1/responses through a real stack with the official openai client: text and message input,
instructions, max_output_tokens (incomplete), text.format json_schema (``responses.parse``), function tools
with a function_call_output round trip, streaming events equal to the whole answer, and 400s for what a
stateless server cannot do."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from stack import MODEL, Stack


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: bool
    score: int = Field(ge=0, le=10)


TOOL = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up",
    "parameters": {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 8}},
        "required": ["word"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: str) -> Iterator[Stack]:
    with Stack(tiny_llama_dir, num_workers=1, engine_options={"kv_cache_memory_mb": 16}) as running:
        running.client = openai.OpenAI(
            base_url=f"{running.api_url}/v1", api_key="x", max_retries=0, timeout=120
        )
        yield running


def test_text_input_with_instructions(stack: Stack) -> None:
    response = stack.client.responses.create(
        model=MODEL, input="Say hello", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    assert response.object == "response" and response.id.startswith("resp")
    assert response.output[0].type == "message" and response.output_text
    assert response.status in ("completed", "incomplete")
    assert response.usage.output_tokens <= 6 and response.usage.input_tokens > 0
    long = stack.client.responses.create(
        model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        max_output_tokens=3, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert long.status == "incomplete" and long.incomplete_details.reason == "max_output_tokens"


def test_stream_events_assemble_to_the_whole(stack: Stack) -> None:
    args = dict(model=MODEL, input="Tell me a story", max_output_tokens=12, temperature=0)
    whole = stack.client.responses.create(**args)
    events = list(stack.client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.done"} <= set(
        kinds
    )


def test_parse_with_a_json_schema_format(stack: Stack) -> None:
    parsed = stack.client.responses.parse(
        model=MODEL, input="Judge it", text_format=Answer, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, Answer)


@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_call_and_its_output(stack: Stack, stream: bool) -> None:
    args = dict(
        model=MODEL, input="Look up 'cat'", tools=[TOOL], tool_choice="required", max_output_tokens=60,
        parallel_tool_calls=False,  # random weights would keep adding calls to the array until the length cap
    )  # fmt: skip
    if stream:
        events = list(stack.client.responses.create(**args, stream=True))
        assert events[-1].type == "response.completed", [e.type for e in events][-3:]
        calls = events[-1].response.output
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert deltas == calls[0].arguments
    else:
        calls = stack.client.responses.create(**args).output
    call = calls[0]
    assert call.type == "function_call" and call.name == "lookup"
    assert len(json.loads(call.arguments)["word"]) <= 8
    follow = stack.client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Look up 'cat'"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "a small feline"},
        ],
        tools=[TOOL],
        tool_choice="none",  # this tiny model has no tool-call format for "auto"
        max_output_tokens=4,
    )
    assert follow.status in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": [{"type": "image", "url": "x"}]}, "input.0.type"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice"),
    ],
)
def test_what_cannot_be_served_is_400(stack: Stack, extra: dict, param: str) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **extra}
    response = httpx.post(f"{stack.api_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
