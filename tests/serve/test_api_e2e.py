"""Smoke test of the API server on the real controller and a real worker serving the tiny llama checkpoint:
chat (template from the model), streaming, greedy determinism, echo + logprobs scoring, embeddings, metrics,
/tokenize and /detokenize."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from servers import serve_app, unused_port

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.api_server import create_api_app
from longserve.serve.controller_app import create_controller_app
from longserve.serve.worker_app import create_worker_app

MODEL = "tiny"


@pytest.fixture(scope="module")
def api_url(tiny_llama_dir: str) -> Iterator[str]:
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    try:
        with serve_app(create_controller_app(ServeConfig())) as controller_url:
            port = unused_port()
            worker_config = ServeConfig(
                controller_address=controller_url, worker_address=f"http://127.0.0.1:{port}", worker_port=port
            )
            with serve_app(create_worker_app(engine, worker_config, MODEL), port=port):
                deadline = time.monotonic() + 15
                while not httpx.post(f"{controller_url}/list_models").json()["models"]:
                    assert time.monotonic() < deadline, "the worker did not register"
                    time.sleep(0.05)
                with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as url:
                    yield url
    finally:
        engine.shutdown()


@pytest.fixture
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_stream_equals_whole_greedy(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0


def test_echo_logprobs_scores_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="the cat sat", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "the cat sat"
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == out.usage.prompt_tokens
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert out.usage.completion_tokens == 0


def test_embeddings_and_metrics(client: openai.OpenAI, api_url: str) -> None:
    out = client.embeddings.create(model=MODEL, input=["a b", "c"])
    assert len(out.data) == 2 and sum(v * v for v in out.data[0].embedding) == pytest.approx(1, abs=1e-3)
    # A chat model's embedding is the normalised mean of its hidden states, and /v1/models says so.
    card = client.models.retrieve(MODEL).model_dump()
    assert (card["pooling"], card["embedding_only"], card["normalized_embeddings"]) == ("mean", False, True)
    assert card["embedding_dimensions"] == len(out.data[0].embedding)
    text = httpx.get(f"{api_url}/metrics").text
    assert f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"' in text
    assert "vllm:generation_tokens_total" in text


def test_context_length_error_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)


def test_tokenize_and_detokenize_round_trip(client: openai.OpenAI, api_url: str) -> None:
    text = "Once upon a time, tokens"
    plain = httpx.post(f"{api_url}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert plain["count"] == len(plain["tokens"]) > 0 and plain["max_model_len"] > 0
    # /v1/models carries the same context length (vLLM's max_model_len field)
    assert client.models.retrieve(MODEL).model_dump()["max_model_len"] == plain["max_model_len"]
    assert [m.model_dump()["max_model_len"] for m in client.models.list()] == [plain["max_model_len"]]
    bare = httpx.post(
        f"{api_url}/tokenize",
        json={"model": MODEL, "prompt": text, "add_special_tokens": False, "return_token_strs": True},
    ).json()
    assert len(bare["token_strs"]) == bare["count"] <= plain["count"]
    back = httpx.post(f"{api_url}/detokenize", json={"model": MODEL, "tokens": bare["tokens"]}).json()
    assert back["prompt"] == text

    # Chat messages are rendered by the model's template: the count is what a chat request is charged.
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    chat = httpx.post(f"{api_url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            "/tokenize",
            {"model": MODEL, "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            400,
            "prompt",
        ),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"model": MODEL, "tokens": "12"}, 400, "tokens"),
    ],
)
def test_tokenize_errors_are_openai_shaped(api_url: str, path, body, status, param) -> None:
    response = httpx.post(f"{api_url}{path}", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_logit_bias_forces_or_removes_a_token(client: openai.OpenAI) -> None:
    args = dict(
        model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    plain = client.completions.create(**args, logprobs=1)
    first = plain.choices[0].logprobs.tokens[0]
    tokenized = httpx.post(
        f"{str(client.base_url).removesuffix('/v1/')}/tokenize",
        json={"model": MODEL, "prompt": first, "add_special_tokens": False},
    ).json()
    (token_id,) = tokenized["tokens"]
    banned = client.completions.create(**args, logprobs=1, logit_bias={str(token_id): -100})
    assert first not in banned.choices[0].logprobs.tokens
    forced = client.completions.create(**args, logit_bias={str(token_id): 100})
    assert forced.choices[0].text == first * 6
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**args, logit_bias={"99999999": 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**args, logit_bias={"hello": 5})
