"""API server error paths with raw HTTP: statuses and OpenAI error bodies (400/401/404/413/503), worker
failover, an engine failing a request mid-stream, and a client hanging up. After every error the server keeps serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from api_fakes import MODEL, create_fake_controller, create_fake_worker, sse_events
from servers import serve_app, unused_port

from longserve.config import ServeConfig
from longserve.serve.api_server import create_api_app

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4096


@dataclass
class Stack:
    api: str
    worker_url: str
    worker_app: object
    controller_app: object

    def post(self, path: str, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", AUTH)
        kwargs.setdefault("timeout", 20)
        return httpx.post(f"{self.api}{path}", **kwargs)

    def assert_still_serving(self) -> None:
        r = self.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    worker_app = create_fake_worker()
    with serve_app(worker_app) as worker_url:
        controller_app = create_fake_controller([worker_url])
        with serve_app(controller_app) as controller_url:
            config = ServeConfig(
                controller_address=controller_url,
                api_keys=(KEY,),
                max_request_body_bytes=BODY_LIMIT,
                worker_connect_retries=2,
            )
            with serve_app(create_api_app(config)) as api_url:
                yield Stack(api_url, worker_url, worker_app, controller_app)


@pytest.fixture
def workers(stack: Stack) -> Iterator[list[str]]:
    """The controller's worker list, restored after the test."""
    saved = list(stack.controller_app.state.workers)
    yield stack.controller_app.state.workers
    stack.controller_app.state.workers[:] = saved


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_json_is_400(stack: Stack) -> None:
    r = stack.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={**AUTH, "content-type": "application/json"},
    )
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    stack.assert_still_serving()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "top_logprobs": 50,
                "logprobs": True,
            },
            "top_logprobs",
        ),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_invalid_chat_parameters_are_400_naming_the_field(stack: Stack, body: dict, param: str) -> None:
    error = error_of(stack.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_invalid_completion_parameters_are_400(stack: Stack, body: dict, param: str) -> None:
    error = error_of(stack.post("/v1/completions", json=body), 400)
    assert error["param"] == param


def test_context_length_error_names_the_limit(stack: Stack) -> None:
    r = stack.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 60, "max_tokens": 10})
    error = error_of(r, 400)
    assert (
        error["code"] == "context_length_exceeded" and "64" in error["message"] and "60" in error["message"]
    )
    stack.assert_still_serving()


def test_unknown_model_is_404(stack: Stack) -> None:
    for path, body in [
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ),
        ("/v1/embeddings", {"model": "nope", "input": "x"}),
    ]:
        error = error_of(stack.post(path, json=body), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert httpx.get(f"{stack.api}/v1/models/nope", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic sk-test"}],
)
def test_bad_or_missing_key_is_401(stack: Stack, headers: dict) -> None:
    error = error_of(
        stack.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers), 401
    )
    assert error["type"] == "authentication_error"
    assert httpx.get(f"{stack.api}/v1/models", headers=headers).status_code == 401


def test_openai_client_with_wrong_key_raises_authentication_error(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.api}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_oversized_body_is_413(stack: Stack) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (BODY_LIMIT * 4)}).encode()
    error = error_of(
        stack.post("/v1/completions", content=body, headers={**AUTH, "content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: the size is only seen as the body streams in
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = stack.post("/v1/completions", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    error_of(r, 413)
    stack.assert_still_serving()


def test_no_worker_is_503_with_retry_after(stack: Stack, workers: list[str]) -> None:
    workers.clear()
    r = stack.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    error = error_of(r, 503)
    assert int(r.headers["retry-after"]) > 0 and error["type"] == "server_error"


def test_all_workers_unreachable_is_503(stack: Stack, workers: list[str]) -> None:
    workers[:] = [f"http://127.0.0.1:{unused_port()}" for _ in range(5)]
    r = stack.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    error_of(r, 503)
    assert "retry-after" in r.headers


def test_failover_when_first_worker_refuses(stack: Stack, workers: list[str]) -> None:
    dead = f"http://127.0.0.1:{unused_port()}"
    workers[:] = [dead, stack.worker_url]
    before = len(stack.controller_app.state.address_requests)
    for stream in (False, True):
        r = stack.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": stream}
        )
        assert r.status_code == 200, r.text
    asked = stack.controller_app.state.address_requests[before:]
    assert [a.exclude for a in asked] == [[], [dead], [], [dead]]


def test_engine_failure_mid_stream_is_an_error_event_then_done(stack: Stack) -> None:
    r = stack.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "DIE"}],
            "max_tokens": 10,
            "stream": True,
        },
    )
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "request_failed" and error["type"] == "server_error"
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2])
    stack.assert_still_serving()


def test_openai_client_raises_on_stream_error_event(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.api}/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="DIE", max_tokens=10, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)


def test_engine_failure_without_streaming_is_500(stack: Stack) -> None:
    r = stack.post("/v1/completions", json={"model": MODEL, "prompt": "DIE", "max_tokens": 10})
    assert error_of(r, 500)["code"] == "request_failed"
    stack.assert_still_serving()


def test_client_disconnect_closes_worker_stream(stack: Stack) -> None:
    aborted = stack.worker_app.state.engine.aborted
    body = {"model": MODEL, "prompt": "SLOW", "max_tokens": None, "stream": True}
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{stack.api}/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one token seen; now hang up
    deadline = time.monotonic() + 5
    while stack.worker_app.state.engine.aborted == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.worker_app.state.engine.aborted == aborted + 1
    stack.assert_still_serving()


def test_client_disconnect_without_streaming_closes_worker_stream(stack: Stack) -> None:
    aborted = stack.worker_app.state.engine.aborted
    with pytest.raises(httpx.ReadTimeout):
        stack.post(
            "/v1/completions", json={"model": MODEL, "prompt": "SLOW", "max_tokens": None}, timeout=0.5
        )
    deadline = time.monotonic() + 5
    while stack.worker_app.state.engine.aborted == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.worker_app.state.engine.aborted == aborted + 1


def test_unknown_route_and_method_keep_openai_shape(stack: Stack) -> None:
    error_of(stack.post("/v1/nothing", json={}), 404)
    assert httpx.get(f"{stack.api}/v1/completions", headers=AUTH).json()["error"]["message"]
