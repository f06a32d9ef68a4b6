"""Reasoning content through the real API server, worker and front end, with a fake engine that says exactly
what the prompt scripts (one token per character, so every tag arrives split across tokens): chat
completions whole and streamed (``reasoning_content``), tool calls after the reasoning, the Responses API's
reasoning items, the Messages API's thinking blocks, and ``chat_template_kwargs`` reaching the template."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import openai
import pytest
from api_fakes import MODEL, create_fake_controller, create_fake_worker
from servers import serve_app

from longserve.config import ServeConfig
from longserve.serve.api_server import create_api_app

SCRIPT = "SAY:<think>add 2 and 2</think>\\n\\nIt is 4."
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    worker = create_fake_worker(context_length=512, reasoning_parser="think", tool_call_parser="hermes")
    with serve_app(worker) as worker_url, serve_app(create_fake_controller([worker_url])) as controller_url:
        with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as url:
            yield url


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="x", max_retries=0)


def _ask(script: str) -> list[dict]:
    return [{"role": "user", "content": script.replace("\\n", "\n")}]


def test_chat_splits_reasoning_whole_and_streamed(client: openai.OpenAI) -> None:
    message = client.chat.completions.create(model=MODEL, messages=_ask(SCRIPT)).choices[0].message
    assert message.reasoning_content == "add 2 and 2" and message.content == "It is 4."
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=_ask(SCRIPT), stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            assert "<" not in content and "<" not in reasoning  # no piece of a tag leaks
    assert (reasoning, content) == ("add 2 and 2", "It is 4.")


def test_an_answer_without_reasoning_has_none(client: openai.OpenAI) -> None:
    message = client.chat.completions.create(model=MODEL, messages=_ask("SAY:plain")).choices[0].message
    assert message.content == "plain" and getattr(message, "reasoning_content", None) is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_call_after_the_reasoning_is_parsed(client: openai.OpenAI, stream: bool) -> None:
    script = 'SAY:<think>use the tool</think><tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'
    args = dict(model=MODEL, messages=_ask(script), tools=TOOLS)
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        reasoning, calls = choice.message.reasoning_content, choice.message.tool_calls
        names, arguments = [c.function.name for c in calls], [c.function.arguments for c in calls]
        finish = choice.finish_reason
    else:
        reasoning, names, arguments, finish = "", [], [], None
        for chunk in client.chat.completions.create(**args, stream=True):
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                for call in choice.delta.tool_calls or []:
                    if call.function.name:
                        names.append(call.function.name)
                        arguments.append("")
                    arguments[-1] += call.function.arguments or ""
                finish = choice.finish_reason or finish
    assert reasoning == "use the tool" and names == ["add"] and json.loads(arguments[0]) == {"a": 2}
    assert finish == "tool_calls"


def test_responses_give_a_reasoning_item(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input=SCRIPT.replace("\\n", "\n"))
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].content[0].text == "add 2 and 2" and response.output_text == "It is 4."
    events = list(client.responses.create(model=MODEL, input=SCRIPT.replace("\\n", "\n"), stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == "add 2 and 2"
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_messages_give_thinking_blocks(api_url: str) -> None:
    client = anthropic.Anthropic(base_url=api_url, api_key="x", max_retries=0)
    message = client.messages.create(model=MODEL, max_tokens=60, messages=_ask(SCRIPT))
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "add 2 and 2" and message.content[1].text == "It is 4."
    with client.messages.stream(model=MODEL, max_tokens=60, messages=_ask(SCRIPT)) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[
        0
    ].thinking == "add 2 and 2"


def test_chat_template_kwargs_reach_the_template_and_reserved_names_are_refused(api_url: str, client) -> None:
    import httpx

    body = {"model": MODEL, "messages": _ask("SAY:x"), "chat_template_kwargs": {"tools": []}}
    refused = httpx.post(f"{api_url}/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"
    body["chat_template_kwargs"] = {"enable_thinking": False}
    assert httpx.post(f"{api_url}/v1/chat/completions", json=body).status_code == 200
