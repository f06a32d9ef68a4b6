"""Hostile input and overload against the real stack on loopback: one bad request never hurts another, every
request gets an answer in OpenAI's shape, full queues answer 429 at once, and nothing is left behind."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from burst import burst, check_burst
from servers import wait_until
from stack import MODEL, Stack, all_blocks_free

JSON = {"content-type": "application/json"}


def _idle(stack: Stack) -> bool:
    return all(
        all_blocks_free(engine)
        and worker.in_flight == 0
        and worker.semaphore._value == worker.config.worker_concurrency
        for engine, worker in zip(stack.engines, stack.workers, strict=True)
    )


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture(scope="module")
def stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1) as stack:
        yield stack


@pytest.mark.parametrize(
    "overrides",
    [
        {"temperature": 1e-40},
        {"temperature": 5e-324},
        {"repetition_penalty": 1e-300},
        {"repetition_penalty": 5e-324},
        {"temperature": 2, "top_p": 1e-300, "min_p": 1.0},
    ],
)
def test_nan_inducing_values_never_touch_a_running_stream(stack, overrides):
    client = stack.client
    stream = client.completions.create(
        model=MODEL,
        prompt="The quick brown",
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 8, **overrides}
    response = httpx.post(f"{stack.api_url}/v1/completions", json=body, timeout=30)
    if response.status_code == 400:  # rejected up front, naming the field
        assert _assert_openai_error(response, 400)["param"] in overrides
    else:  # or well defined: a tiny temperature is greedy
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    rest = list(chunks)
    assert [first, *rest][-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) > 0 for c in [first, *rest]) > 10
    after = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length")
    wait_until(lambda: _idle(stack), what="the worker to be idle")


LONE_SURROGATE = "a\udfffb"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": LONE_SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", LONE_SURROGATE]}, "prompt.1"),
        ("/v1/completions", {"prompt": "ok", "stop": [LONE_SURROGATE]}, "stop.0"),
        ("/v1/completions", {"prompt": "ok", "stream": True, "user": LONE_SURROGATE}, "user"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": LONE_SURROGATE}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/embeddings", {"input": LONE_SURROGATE}, "input"),
        ("/v1/embeddings", {"input": ["fine", LONE_SURROGATE]}, "input.1"),
        ("/v1/completions", {"model": LONE_SURROGATE, "prompt": "x"}, "model"),
    ],
)
def test_lone_surrogates_get_400_naming_the_field_within_a_second(stack, path, body, param):
    raw = json.dumps({"model": MODEL, **body})  # ensure_ascii: the surrogate travels as a \udfff escape
    assert "\\udfff" in raw
    start = time.monotonic()
    response = httpx.post(f"{stack.api_url}{path}", content=raw, headers=JSON, timeout=5)
    assert time.monotonic() - start < 1.0
    error = _assert_openai_error(response, 400)
    assert error["param"] == param and error["code"] == "invalid_unicode"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": "4"}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"n": 2.0}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"echo": 1}, "echo"),
    ],
)
def test_strict_types_and_ranges_name_the_api_field(stack, body, param):
    response = httpx.post(f"{stack.api_url}/v1/completions", json={"model": MODEL, "prompt": "x", **body})
    assert _assert_openai_error(response, 400)["param"] == param


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("field", ["repetition_penalty", "temperature", "presence_penalty", "top_p"])
def test_non_finite_numbers_are_rejected_by_the_api_server(stack, field, literal):
    raw = f'{{"model": "{MODEL}", "prompt": "x", "{field}": {literal}}}'
    response = httpx.post(f"{stack.api_url}/v1/completions", content=raw, headers=JSON)
    assert _assert_openai_error(response, 400)["param"] == field


def test_the_published_schema_promises_only_what_is_served(stack):
    schema = httpx.get(f"{stack.api_url}/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "guided_json", "logit_bias"} <= set(chat)
    assert not {"best_of", "suffix"} & set(completion)
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "429", "503"} <= set(responses)
    # ...and what it advertises it does reject with 400, never 422.
    response = httpx.post(f"{stack.api_url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    _assert_openai_error(response, 400)


@pytest.fixture(scope="module")
def narrow_stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1, worker_concurrency=4, max_queue_len=8) as stack:
        yield stack


def test_a_burst_of_300_gets_answers_or_429s_quickly_and_leaves_nothing_behind(narrow_stack):
    stack = narrow_stack
    answers = burst(stack.api_url, MODEL, 300)
    check_burst(answers, min_ok=12, max_429_s=10)  # 4 running + 8 queued at the least
    statuses = [a.status for a in answers]
    metrics = httpx.get(f"{stack.api_url}/metrics").text
    assert "longserve:worker_rejected_requests" in metrics and "longserve:api_requests_rejected" in metrics
    wait_until(lambda: _idle(stack), what="every request, block and slot to be released")
    out = stack.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert stack.workers[0].num_rejected == statuses.count(429)


def test_the_api_servers_own_bound_answers_429(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1, max_in_flight_requests=2) as stack:
        gate = threading.Event()
        engine = stack.engines[0].engine
        step = engine.step

        def held_step():
            gate.wait(10)
            return step()

        engine.step = held_step
        try:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            with httpx.Client(timeout=30) as client:
                threads = [
                    threading.Thread(
                        target=client.post, args=(f"{stack.api_url}/v1/completions",), kwargs={"json": body}
                    )
                    for _ in range(2)
                ]
                for t in threads:
                    t.start()
                wait_until(lambda: stack.workers[0].in_flight == 2, what="two requests in flight")
                error = _assert_openai_error(client.post(f"{stack.api_url}/v1/completions", json=body), 429)
                assert error["code"] == "rate_limit_exceeded"
                assert (
                    httpx.get(f"{stack.api_url}/health").status_code == 200
                )  # unlimited routes still answer
                gate.set()
                for t in threads:
                    t.join()
        finally:
            gate.set()
            del engine.step
        assert (
            'longserve:api_requests_rejected_total{reason="api_in_flight_limit"} 1.0'
            in httpx.get(f"{stack.api_url}/metrics").text
        )


def test_a_full_worker_sends_the_request_to_another(tiny_llama_dir):
    with Stack(tiny_llama_dir, 2, worker_concurrency=1, max_queue_len=0) as stack:
        gate = threading.Event()
        engine = stack.engines[0].engine
        step = engine.step

        def held_step():
            gate.wait(10)
            return step()

        engine.step = held_step  # worker 0 takes one request and holds it
        try:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            with httpx.Client(timeout=30) as client:
                holder = threading.Thread(
                    target=lambda: [
                        client.post(f"{stack.api_url}/v1/completions", json=body) for _ in range(2)
                    ]
                )
                holder.start()
                wait_until(lambda: stack.workers[0].in_flight == 1, what="worker 0 to be full")
                for _ in range(4):  # dispatch may pick worker 0 first; its 429 sends the request on
                    response = client.post(f"{stack.api_url}/v1/completions", json=body)
                    assert response.status_code == 200, response.text
                gate.set()
                holder.join()
        finally:
            gate.set()
            del engine.step


def test_request_timeout_ends_a_stream_with_an_error_event_and_a_call_with_504(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1, request_timeout_s=0.5) as stack:
        engine = stack.engines[0].engine
        step = engine.step

        def slow_step():
            time.sleep(0.05)
            return step()

        engine.step = slow_step
        try:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
            start = time.monotonic()
            error = _assert_openai_error(
                httpx.post(f"{stack.api_url}/v1/completions", json=body, timeout=30), 504
            )
            assert error["code"] == "request_timeout" and time.monotonic() - start < 3
            with pytest.raises(openai.APIError, match="request timeout"):
                stream = stack.client.completions.create(
                    model=MODEL, prompt="x", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
                )
                for _ in stream:
                    pass
        finally:
            del engine.step
        wait_until(lambda: _idle(stack), what="the timed-out requests to be aborted")


def test_a_silent_stream_gets_sse_keepalive_comments_that_clients_ignore(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1, sse_keepalive_s=0.2) as stack:
        engine = stack.engines[0].engine
        step, calls = engine.step, []

        def slow_first_steps():
            calls.append(1)
            if len(calls) <= 2:
                time.sleep(0.7)  # a long prefill or queue wait
            return step()

        engine.step = slow_first_steps
        try:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
            raw = httpx.post(f"{stack.api_url}/v1/completions", json=body, timeout=30).text
            assert raw.count(": keep-alive\n\n") >= 2 and raw.rstrip().endswith("data: [DONE]")
            calls.clear()
            chunks = list(stack.client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        finally:
            del engine.step


def test_request_stall_timeout_ends_a_stream_that_stops_bringing_tokens(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1, request_stall_timeout_s=0.5) as stack:
        engine = stack.engines[0].engine
        step, calls = engine.step, []

        def stalling_step():
            calls.append(1)
            if len(calls) > 5:
                time.sleep(0.3 if len(calls) < 12 else 1.5)  # slow but flowing, then stalled
            return step()

        engine.step = stalling_step
        try:
            start, texts = time.monotonic(), []
            with pytest.raises(openai.APIError, match="request stall timeout"):
                stream = stack.client.completions.create(
                    model=MODEL, prompt="x", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
                )
                for chunk in stream:
                    texts += [choice.text for choice in chunk.choices]
            assert time.monotonic() - start < 8
            assert len(texts) > 5  # tokens flowed, slowly, before the stall: slow is not stalled
        finally:
            del engine.step
        wait_until(lambda: _idle(stack), timeout=30, what="the stalled request to be aborted")
