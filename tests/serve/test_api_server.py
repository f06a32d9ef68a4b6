"""API server against a fake worker and fake controller, through the official ``openai`` client: the OpenAI
shapes and parameters (streaming, n, stop, seed, logprobs, echo, embeddings, usage)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from api_fakes import MODEL, create_fake_controller, create_fake_worker
from servers import serve_app

from longserve.config import ServeConfig
from longserve.serve.api_server import create_api_app

KEY = "sk-test"


@dataclass
class Stack:
    api: str
    worker_app: object
    controller_app: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api}/v1", api_key=KEY, max_retries=0, timeout=20)

    def last_request(self):
        """The last ``EngineRequest`` the worker's engine got: token ids and validated params."""
        return self.worker_app.state.engine.requests[-1]

    def last_prompt(self) -> str:
        return "".join(map(chr, self.last_request().prompt_token_ids))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    worker_app = create_fake_worker()
    with serve_app(worker_app) as worker_url:
        controller_app = create_fake_controller([worker_url])
        with serve_app(controller_app) as controller_url:
            config = ServeConfig(controller_address=controller_url, api_keys=(KEY, "sk-other"))
            with serve_app(create_api_app(config)) as api_url:
                yield Stack(api_url, worker_app, controller_app)


def test_models_list_and_retrieve(stack: Stack) -> None:
    client = stack.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_renders_the_models_template_and_returns_openai_shape(stack: Stack) -> None:
    out = stack.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        max_tokens=5,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "abcde"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("<system>S<user>hi<assistant>")
    assert out.usage.completion_tokens == 5
    assert stack.last_prompt() == "<system>S<user>hi<assistant>"


def test_chat_max_completion_tokens_wins_and_default_is_unbounded(stack: Stack) -> None:
    client = stack.client()
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=3
    )
    assert stack.last_request().params.max_tokens == 3
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert stack.last_request().params.max_tokens is None
    assert out.choices[0].finish_reason == "stop"


def test_chat_stream_role_first_finish_last_usage_chunk(stack: Stack) -> None:
    chunks = list(
        stack.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == ("abcd" if i == 0 else "bcde")
        assert [c.finish_reason for c in mine][-1] == "length"
        assert all(c.finish_reason is None for c in mine[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_sampling_parameters_pass_through(stack: Stack) -> None:
    stack.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=1234,
        stop="zz",
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 1,
            "ignore_eos": True,
            "stop_token_ids": [7],
            "skip_special_tokens": False,
        },
        user="someone",
    )
    s = stack.last_request().params
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.7, 0.9, 5, 0.1)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (s.seed, s.stop, s.stop_token_ids, s.min_tokens) == (1234, ["zz"], [7], 1)
    assert s.ignore_eos and not s.skip_special_tokens


def test_seed_changes_fake_output_and_stop_ends_it(stack: Stack) -> None:
    client = stack.client()
    seeded = client.completions.create(model=MODEL, prompt="p", max_tokens=3, seed=2)
    assert seeded.choices[0].text == "cde"
    stopped = client.completions.create(model=MODEL, prompt="p", max_tokens=10, stop=["e", "q"])
    assert stack.last_request().params.stop == ["e", "q"]
    assert stopped.choices[0].text == "abcd"
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs(stack: Stack) -> None:
    out = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    assert stack.last_request().params.logprobs == 2
    content = out.choices[0].logprobs.content
    assert [t.token for t in content] == ["a", "b", "c"]
    assert content[0].bytes == [ord("a")] and content[0].logprob == pytest.approx(-0.5)
    assert [len(t.top_logprobs) for t in content] == [2, 2, 2]
    assert content[1].top_logprobs[0].token == "b"


def test_completions_batch_and_n(stack: Stack) -> None:
    out = stack.client().completions.create(model=MODEL, prompt=["one", "two"], max_tokens=2, n=2)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [(c.index, c.text) for c in out.choices] == [(0, "ab"), (1, "bc"), (2, "ab"), (3, "bc")]
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 8


def test_completions_token_id_prompts(stack: Stack) -> None:
    client = stack.client()
    client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=1)
    assert stack.last_request().prompt_token_ids == [104, 105]
    out = client.completions.create(model=MODEL, prompt=[[104, 105], [106]], max_tokens=1)
    assert len(out.choices) == 2 and out.usage.prompt_tokens == 3


def test_completions_default_max_tokens_is_16(stack: Stack) -> None:
    stack.client().completions.create(model=MODEL, prompt="x")
    assert stack.last_request().params.max_tokens == 16


def test_null_fields_mean_defaults_but_null_max_tokens_means_unbounded(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "x", "n": None, "logprobs": None, "stream": None, "echo": None}
    r = httpx.post(f"{stack.api}/v1/completions", json={**body, "max_tokens": None}, headers=headers)
    assert r.status_code == 200, r.text
    assert (
        stack.last_request().params.max_tokens is None and r.json()["choices"][0]["finish_reason"] == "stop"
    )
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "logprobs": None,
        "n": None,
        "seed": None,
    }
    r = httpx.post(f"{stack.api}/v1/chat/completions", json=chat, headers=headers)
    assert r.status_code == 200, r.text


def test_completions_stream_batch_and_usage(stack: Stack) -> None:
    chunks = list(
        stack.client().completions.create(
            model=MODEL, prompt=["a", "b"], max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == {0: "abc", 1: "abc"}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 8


def test_completions_logprobs_shape(stack: Stack) -> None:
    out = stack.client().completions.create(model=MODEL, prompt="hi", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"]
    assert lp.token_logprobs == pytest.approx([-0.5, -0.51, -0.52])
    assert lp.text_offset == [0, 1, 2]
    assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0]["a"] == pytest.approx(-0.5)
    assert len(lp.top_logprobs[0]) == 2


def test_echo_with_logprobs_scores_the_prompt(stack: Stack) -> None:
    """lm-eval-harness loglikelihood: echo, max_tokens=0, logprobs=0."""
    out = stack.client().completions.create(model=MODEL, prompt="xyz", max_tokens=0, echo=True, logprobs=0)
    sent = stack.last_request().params
    assert (sent.max_tokens, sent.prompt_logprobs) == (1, 0)
    choice = out.choices[0]
    assert choice.text == "xyz" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["x", "y", "z"]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([-0.5, -0.51])
    assert choice.logprobs.top_logprobs[0] is None and choice.logprobs.top_logprobs[1] == {"y": -0.5}
    assert choice.logprobs.text_offset == [0, 1, 2]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == 3


def test_echo_max_tokens_1_and_token_id_prompt(stack: Stack) -> None:
    out = stack.client().completions.create(
        model=MODEL, prompt=[[120, 121]], max_tokens=1, echo=True, logprobs=1
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "xya"  # token id prompts echo as their tokens' texts
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == 3
    assert lp.tokens == ["x", "y", "a"]


def test_echo_stream(stack: Stack) -> None:
    chunks = list(
        stack.client().completions.create(model=MODEL, prompt="pq", max_tokens=2, echo=True, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == "pqab"
    assert chunks[0].choices[0].text == "pq"


def test_embeddings_float_and_base64(stack: Stack) -> None:
    client = stack.client()
    out = client.embeddings.create(model=MODEL, input=["ab", "abcd"], encoding_format="float")
    assert [d.index for d in out.data] == [0, 1]
    assert out.data[0].embedding[0] == pytest.approx(2 / 5**0.5)
    assert out.usage.prompt_tokens == 6
    default = client.embeddings.create(model=MODEL, input="ab")  # the client asks for base64 by default
    assert default.data[0].embedding[0] == pytest.approx(2 / 5**0.5)
    raw = httpx.post(
        f"{stack.api}/v1/embeddings",
        json={"model": MODEL, "input": [[1, 2, 3]], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    vector = struct.unpack("<3f", base64.b64decode(raw["data"][0]["embedding"]))
    assert vector[0] == pytest.approx(3 / 10**0.5)


def test_health_and_metrics_are_open(stack: Stack) -> None:
    assert httpx.get(f"{stack.api}/health").status_code == 200
    stack.client().completions.create(model=MODEL, prompt="m", max_tokens=2, stream=True).close()
    stack.client().completions.create(model=MODEL, prompt="m", max_tokens=2)
    text = httpx.get(f"{stack.api}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "longserve:api_requests_in_flight",
    ):
        assert name in text, name
    # Live worker status (running=2) wins over the controller's stale copy (running=7).
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 2.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="fake-model"' in text
