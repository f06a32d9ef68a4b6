"""Structured output through a real stack with the official openai client: response_format (pydantic models via
``beta.chat.completions.parse``, json_object), vLLM's guided_regex / guided_choice / guided_grammar / guided_json,
streaming, and 400s naming the field for invalid grammars. Run on the default model and on a tiny random
checkpoint: the grammar alone must make random weights produce valid output."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from stack import MODEL, Stack


class Color(StrEnum):
    red = "red"
    green = "green"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict mode has it

    city: str = Field(max_length=12)
    zip_code: int = Field(ge=0, le=99999)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Bounded strings, numbers and lists, so that even random weights finish within max_tokens.
    name: str = Field(max_length=10)
    favourite: Color
    address: Address
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)
    nickname: str | None = Field(None, max_length=8)


@pytest.fixture(scope="module", params=["default", "tiny"])
def stack(request, tiny_llama_dir: str) -> Iterator[Stack]:
    model_dir = None if request.param == "default" else tiny_llama_dir
    with Stack(model_dir, num_workers=1, engine_options={"kv_cache_memory_mb": 64}) as running:
        running.client = openai.OpenAI(
            base_url=f"{running.api_url}/v1", api_key="x", max_retries=0, timeout=120
        )
        yield running


MESSAGES = [{"role": "user", "content": "Describe a person called Ann who lives in Paris, as JSON."}]


def test_parse_returns_the_pydantic_object(stack: Stack) -> None:
    completion = stack.client.beta.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Person, max_tokens=300, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_json_schema_is_valid_and_equals_the_whole(stack: Stack) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True},
    }
    args = dict(
        model=MODEL, messages=MESSAGES, response_format=response_format, max_tokens=300, temperature=0
    )
    whole = stack.client.chat.completions.create(**args).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or "" for c in stack.client.chat.completions.create(**args, stream=True)
    ]
    assert "".join(pieces) == whole
    Person.model_validate_json(whole)


def test_json_object_gives_an_object(stack: Stack) -> None:
    completion = stack.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=40, temperature=0,
        extra_body={"guided_json": None},
    )  # fmt: skip
    text = completion.choices[0].message.content
    assert text.startswith("{")
    if completion.choices[0].finish_reason == "stop":  # an unbounded object may run out of tokens
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": r"[0-9]{3}-[a-c]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2}", t)),
        ({"guided_choice": ["sunny", "rainy", "foggy"]}, lambda t: t in {"sunny", "rainy", "foggy"}),
        ({"guided_grammar": 'root ::= "yes" | "no" " way"'}, lambda t: t in {"yes", "no way"}),
        ({"guided_grammar": 'start: "A"+ "B"'}, lambda t: re.fullmatch("A+B", t)),
    ],
)
def test_guided_options_on_chat_and_completions(stack: Stack, extra: dict, check) -> None:
    chat = stack.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0.8, seed=1, extra_body=extra
    )
    assert chat.choices[0].finish_reason == "stop"
    assert check(chat.choices[0].message.content), chat.choices[0].message.content
    completion = stack.client.completions.create(
        model=MODEL, prompt="The weather:", max_tokens=20, extra_body=extra, n=2, temperature=1.0
    )
    for choice in completion.choices:
        assert check(choice.text), choice.text


def test_guided_json_on_completions_streaming(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    stream = stack.client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=30, stream=True, extra_body={"guided_json": schema}
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text)["ok"], bool)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(stack: Stack, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    # ...and the server still answers.
    assert stack.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
