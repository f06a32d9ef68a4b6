"""Tool calling on a model whose chat template has no tool format (the default model), through the official
client: the tools are described in the prompt and the output is text or valid calls, for tool_choice auto,
required and a named function, whole and streamed; parallel_tool_calls=false gives at most one call; a tool
result continues the conversation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from stack import MODEL, Stack

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with Stack(None, 1, engine_options={"kv_cache_memory_mb": 64}) as stack:
        yield openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="x", max_retries=0, timeout=120)


def _check(call) -> None:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    else:
        assert call.function.name == "get_time"


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_any_tool_choice_gives_valid_calls_or_text(client: openai.OpenAI, choice) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60, temperature=0
    ).choices[0]
    if choice == "auto" and not answer.message.tool_calls:
        assert answer.message.content and answer.finish_reason in ("stop", "length")
        return
    # (required allows several calls: a small model may go on writing them until max_tokens)
    assert answer.finish_reason in ("tool_calls", "length") and answer.message.tool_calls
    for call in answer.message.tool_calls:
        _check(call)
    if isinstance(choice, dict):
        assert [c.function.name for c in answer.message.tool_calls] == ["get_weather"]


def test_auto_streams_what_it_answers_whole_and_one_call_without_parallel(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message
    names, arguments, content = [], [], ""
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.function.name:
                    names.append(call.function.name)
                    arguments.append("")
                arguments[-1] += call.function.arguments or ""
    assert names == [c.function.name for c in whole.tool_calls]
    assert arguments == [c.function.arguments for c in whole.tool_calls]
    assert content == (whole.content or "")
    for seed in range(3):
        single = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
            max_tokens=80, temperature=1.0, seed=seed,
        ).choices[0].message  # fmt: skip
        assert len(single.tool_calls) == 1


def test_a_tool_result_continues_the_conversation(client: openai.OpenAI) -> None:
    call = (
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
        )
        .choices[0]
        .message.tool_calls[0]
    )
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_langchain_bind_tools_gets_valid_calls(client: openai.OpenAI) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"sunny in {city}"

    chat = ChatOpenAI(
        model=MODEL, base_url=str(client.base_url), api_key="x", temperature=0, max_tokens=60, max_retries=0
    )
    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    streamed = None
    for piece in chat.bind_tools([get_weather], tool_choice="any").stream("Weather in Paris?"):
        streamed = piece if streamed is None else streamed + piece
    assert streamed.tool_calls and streamed.tool_calls[0]["name"] == "get_weather"
