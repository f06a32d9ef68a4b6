"""The Anthropic Messages API through a real stack with the official ``anthropic`` SDK: plain and streamed
messages, a system prompt, stop sequences, a forced tool returning a valid ``tool_use`` block, a
``tool_result`` follow-up, count_tokens, and bad requests (no max_tokens, an unknown model, a wrong key) in
Anthropic's error shape. The tiny checkpoint has a Hermes-style template, so tools reach the model."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest
from hermes import hermes_model_dir
from stack import MODEL, Stack

KEY = "test-key"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The SDK (2.x) no longer takes sampling parameters as arguments; the API still does.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model_dir = hermes_model_dir(tiny_llama_dir, tmp_path_factory.mktemp("anthropic"))
    with Stack(
        model_dir, num_workers=1, engine_options={"kv_cache_memory_mb": 16}, api_keys=(KEY,)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.api_url, api_key=KEY, max_retries=0, timeout=120)


def test_a_message_with_a_system_prompt_and_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=12, system="You are terse.", messages=ASK, extra_body=GREEDY
    )
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.usage.output_tokens <= 12 and message.usage.input_tokens > 0
    again = client.messages.create(
        model=MODEL, max_tokens=12, system="You are terse.", messages=ASK, extra_body=GREEDY
    )
    assert again.content[0].text == message.content[0].text  # greedy


def test_streamed_text_equals_the_whole_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=20, messages=ASK, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=20, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_a_stop_sequence_ends_the_message(client: anthropic.Anthropic) -> None:
    whole = (
        client.messages.create(model=MODEL, max_tokens=30, messages=ASK, extra_body=GREEDY).content[0].text
    )
    stop = whole.strip()[3:6]
    assert stop.strip(), whole
    message = client.messages.create(
        model=MODEL, max_tokens=30, messages=ASK, stop_sequences=[stop], extra_body=GREEDY
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == whole[: whole.index(stop)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_tool_gives_a_tool_use_block_and_a_result_continues(
    client: anthropic.Anthropic, stream: bool
) -> None:
    args = dict(
        model=MODEL, max_tokens=120, messages=ASK, tools=[WEATHER], extra_body={"temperature": 1.0},
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )  # fmt: skip
    if stream:
        with client.messages.stream(**args) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**args)
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert (
        use.name == "get_weather"
        and set(use.input) == {"city", "unit"}
        and use.input["unit"] in ("celsius", "fahrenheit")
    )
    follow = client.messages.create(
        model=MODEL, max_tokens=10, tools=[WEATHER], extra_body=GREEDY,
        messages=[*ASK, {"role": "assistant", "content": message.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]}],
    )  # fmt: skip
    assert follow.content and follow.usage.input_tokens > message.usage.input_tokens


def test_count_tokens_counts_what_a_message_would_take(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=ASK, system="You are terse.")
    message = client.messages.create(model=MODEL, max_tokens=1, system="You are terse.", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    with_tools = client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER])
    assert with_tools.input_tokens > client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens


def test_bad_requests_get_anthropics_error_shape(stack: Stack, client: anthropic.Anthropic) -> None:
    url = f"{stack.api_url}/v1/messages"
    missing = httpx.post(url, json={"model": MODEL, "messages": ASK}, headers={"x-api-key": KEY})
    assert missing.status_code == 400
    body = missing.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    wrong = anthropic.Anthropic(base_url=stack.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model=MODEL, max_tokens=5, messages=ASK)
    assert denied.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(
            model=MODEL, max_tokens=5,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}],
        )  # fmt: skip
    assert "image" in image.value.body["error"]["message"]
    # The OpenAI routes keep OpenAI's shape.
    openai_style = httpx.post(
        f"{stack.api_url}/v1/chat/completions", json={"model": MODEL}, headers={"x-api-key": KEY}
    )
    assert openai_style.status_code == 400 and "param" in openai_style.json()["error"]
