"""Tool calling through a real stack with the official openai client, on a tiny random checkpoint whose chat
template is Hermes/Qwen-style (so the tools reach the template and the "hermes" parser is detected):
tool_choice required and named (the grammar makes random weights write valid arguments), streamed deltas that
reassemble to the whole answer's calls, auto parsing of the model's own format, a tool reply continuing the
conversation, and 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from hermes import hermes_model_dir
from pydantic import BaseModel, ConfigDict, Field
from stack import MODEL, Stack


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=10)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": Weather.model_json_schema(),
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model_dir = hermes_model_dir(tiny_llama_dir, tmp_path_factory.mktemp("hermes"))
    with Stack(model_dir, num_workers=1, engine_options={"kv_cache_memory_mb": 16}) as running:
        running.client = openai.OpenAI(
            base_url=f"{running.api_url}/v1", api_key="x", max_retries=0, timeout=120
        )
        yield running


def _check_call(call) -> None:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        Weather.model_validate(arguments)
    else:
        assert call.function.name == "get_time" and arguments["zone"] in {"UTC", "CET"}
    assert call.id.startswith("call_") and call.type == "function"


def test_required_tool_choice_gives_valid_calls(stack: Stack) -> None:
    completion = stack.client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=1.0,
        seed=5,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.content is None
    for call in choice.message.tool_calls:
        _check_call(call)


def test_no_parallel_calls_means_one_call(stack: Stack) -> None:
    for seed in range(3):
        completion = stack.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=120, temperature=1.0, seed=seed,
        )  # fmt: skip
        assert len(completion.choices[0].message.tool_calls) == 1


def test_named_function_gives_its_arguments(stack: Stack) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    completion = stack.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=100, temperature=0
    )
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    _check_call(calls[0])
    assert completion.choices[0].finish_reason == "tool_calls"


def _reassemble(stream) -> tuple[dict[int, dict], str, list[str]]:
    calls: dict[int, dict] = {}
    content, finishes = "", []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id is not None:
                    assert call["id"] is None, "id sent twice"
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return calls, content, finishes


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_streamed_tool_calls_reassemble_to_the_whole(stack: Stack, tool_choice) -> None:
    args = dict(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=300, temperature=0,
        parallel_tool_calls=False,  # greedy random weights would otherwise repeat calls until max_tokens
    )  # fmt: skip
    whole = stack.client.chat.completions.create(**args).choices[0].message.tool_calls
    calls, content, finishes = _reassemble(stack.client.chat.completions.create(**args, stream=True))
    assert content == "" and finishes == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]


# The model's own format, forced through a grammar so the random weights write it: the auto path must parse it.
HERMES_OUTPUT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_own_format(stack: Stack, stream: bool) -> None:
    grammar = (
        'root ::= "' + HERMES_OUTPUT.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    )
    args = dict(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=400, temperature=0,
        extra_body={"guided_grammar": grammar},
    )  # fmt: skip
    if stream:
        calls, content, finishes = _reassemble(stack.client.chat.completions.create(**args, stream=True))
        found = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    else:
        choice = stack.client.chat.completions.create(**args).choices[0]
        content, finishes = choice.message.content, [choice.finish_reason]
        found = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert content.strip() == "Let me check."
    assert found == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert finishes == ["tool_calls"]


def test_tool_none_and_no_tools_stay_plain_text(stack: Stack) -> None:
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        choice = stack.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, **extra
        ).choices[0]
        assert choice.message.tool_calls in (None, []) and choice.finish_reason in ("stop", "length")


def test_a_tool_reply_continues_the_conversation(stack: Stack) -> None:
    first = (
        stack.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0
        )
        .choices[0]
        .message
    )
    call = first.tool_calls[0]
    conversation = MESSAGES + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    reply = stack.client.chat.completions.create(
        model=MODEL, messages=conversation, tools=TOOLS, max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The template saw the arguments as an object (written once by tojson), and the tool's answer.
    rendered = httpx.post(
        f"{stack.api_url}/tokenize", json={"model": MODEL, "messages": conversation}, timeout=30
    ).json()
    text = httpx.post(
        f"{stack.api_url}/detokenize", json={"model": MODEL, "tokens": rendered["tokens"]}, timeout=30
    ).json()["prompt"]
    arguments = json.loads(call.function.arguments)
    assert f'"arguments": {json.dumps(arguments, ensure_ascii=False)}' in text
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tools_are_400_naming_the_field(stack: Stack, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
