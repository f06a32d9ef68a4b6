"""The load generator against a tiny fake OpenAI streaming server: counts, timings, errors, concurrency bound."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from longserve.clients.bench import BenchConfig, default_prompts, main, run_load
from longserve.clients.bench_results import LatencyStats, make_result, percentile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from servers import serve_app  # noqa: E402  (tests/serve/servers.py, shared test helper)

MODEL = "fake-model"


@dataclass
class FakeState:
    """What the fake server saw; also how it behaves (delays, usage, line endings)."""

    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    send_usage: bool = True  # honour stream_options.include_usage
    crlf: bool = False  # end SSE lines with \r\n (allowed by the SSE spec)
    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    unready_polls: int = 0  # /health answers 503 this many times before 200
    health_polls: int = 0


def fake_openai_app(state: FakeState) -> FastAPI:
    """An OpenAI-shaped server; the prompt picks the behaviour: "fail", "error-event", "truncate" or normal."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        state.health_polls += 1
        ready = state.health_polls > state.unready_polls
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        end = "\r\n" if state.crlf else "\n"

        def event(payload: dict | str) -> str:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            return f"data: {data}{end}{end}"

        def choice(text: str | None, finish: str | None = None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        try:
            if chat:  # OpenAI's first chunk carries only the role: no content, so it must not count as TTFT
                yield event(
                    {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                )
            yield f": ping{end}{end}"  # an SSE comment, which the client must skip
            await asyncio.sleep(state.first_token_delay_s)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(state.token_delay_s)
                yield event({"choices": [choice(f"tok{i} ")]})
                if i == 1 and "error-event" in prompt:
                    yield event({"error": {"message": "engine failed", "type": "server_error"}})
                    return
                if i == 1 and "truncate" in prompt:
                    return
            yield event({"choices": [choice(None, "length")]})
            if state.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                yield event({"choices": [], "usage": usage})
            yield event("[DONE]")
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "fail" in prompt:
            error = {"message": "overloaded", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def bench(base_url: str, **overrides) -> BenchConfig:
    values = {"base_url": f"{base_url}/v1", "num_requests": 12, "concurrency": 3, "max_tokens": 5}
    return BenchConfig(**(values | overrides))


def test_counts_and_concurrency_bound() -> None:
    state = FakeState(token_delay_s=0.01)
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url)))
    s = result.summary
    assert (s.num_requests, s.completed, s.errors) == (12, 12, 0)
    assert s.output_tokens == 60 and s.token_count_source == "usage"
    assert all(r.output_tokens == 5 and r.content_chunks == 5 for r in result.requests)
    assert all(r.finish_reason == "length" and r.prompt_tokens == 7 for r in result.requests)
    assert [r.index for r in result.requests] == list(range(12))
    # the bound holds on the server, and with 12 requests queued it is actually reached
    assert state.max_in_flight == 3 and s.max_in_flight == 3
    assert state.requests == 12
    assert result.config["model"] == MODEL  # discovered through /v1/models
    assert s.requests_per_s == pytest.approx(12 / s.duration_s)
    assert s.output_tokens_per_s == pytest.approx(60 / s.duration_s)


def test_concurrency_one_is_serial() -> None:
    state = FakeState(token_delay_s=0.005)
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, num_requests=4, concurrency=1)))
    assert state.max_in_flight == 1 and result.summary.max_in_flight == 1
    starts = [r.start_s for r in result.requests]
    ends = [r.start_s + r.e2e_s for r in result.requests]
    assert all(nxt >= end - 1e-3 for end, nxt in zip(ends, starts[1:], strict=False))


def test_ttft_and_itl_follow_the_server_delays() -> None:
    state = FakeState(first_token_delay_s=0.15, token_delay_s=0.03)
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, num_requests=4, concurrency=2, max_tokens=6)))
    s = result.summary
    assert s.ttft.count == 4 and s.ttft.p50 >= 0.15
    assert s.itl.count == 4 * 5  # one gap between each pair of the 6 content chunks
    assert 0.02 <= s.itl.p50 < 0.15
    assert s.itl.p99 >= s.itl.p50 and s.ttft.p99 >= s.ttft.p50
    for r in result.requests:
        assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 5)


def test_tokens_counted_from_chunks_without_usage() -> None:
    state = FakeState(send_usage=False, crlf=True)
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, num_requests=3)))
    s = result.summary
    assert s.completed == 3 and s.token_count_source == "chunks"
    assert s.output_tokens == 15
    assert not any(r.tokens_from_usage for r in result.requests)


def test_completion_endpoint() -> None:
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, endpoint="completion", num_requests=4, model=MODEL)))
    assert result.summary.completed == 4 and result.summary.output_tokens == 20


def test_errors_are_counted_not_raised() -> None:
    state = FakeState()
    prompts = ("ok", "fail", "error-event", "truncate")
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, num_requests=8, prompts=prompts)))
    s = result.summary
    assert (s.completed, s.errors) == (2, 6)
    by_kind = {prompts[r.index % 4]: r for r in result.requests}
    assert by_kind["fail"].status == 500 and "HTTP 500" in by_kind["fail"].error
    assert "engine failed" in by_kind["error-event"].error
    assert "without [DONE]" in by_kind["truncate"].error
    assert by_kind["ok"].ok and by_kind["ok"].error is None
    # throughput and latency count completed requests only
    assert s.output_tokens == 10 and s.ttft.count == 2
    assert len(s.error_samples) == 3


def test_unreachable_server_is_an_error_per_request() -> None:
    with serve_app(FastAPI()) as url:  # a live port; its /v1/chat/completions is 404
        result = asyncio.run(run_load(bench(url, model=MODEL, num_requests=2)))
    assert result.summary.errors == 2 and result.requests[0].status == 404


def test_ignore_eos_and_extra_body_reach_the_server() -> None:
    seen: list[dict] = []
    app = fake_openai_app(FakeState())

    @app.middleware("http")
    async def record(request: Request, call_next):
        if request.method == "POST":
            seen.append(json.loads(await request.body()))
        return await call_next(request)

    with serve_app(app) as url:
        config = bench(url, num_requests=1, ignore_eos=True, extra_body={"min_tokens": 5})
        assert asyncio.run(run_load(config)).summary.completed == 1
    assert seen[0]["ignore_eos"] is True and seen[0]["min_tokens"] == 5
    assert seen[0]["temperature"] == 0.0 and seen[0]["stream"] is True
    assert seen[0]["stream_options"] == {"include_usage": True}


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    with serve_app(fake_openai_app(FakeState())) as url:
        rc = main(["--base-url", f"{url}/v1", "-n", "4", "-c", "2", "--max-tokens", "3", "--json", str(out)])
    assert rc == 0
    assert "4/4 ok" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["summary"]["output_tokens"] == 12 and len(doc["requests"]) == 4


def test_prompts_are_deterministic_and_varied() -> None:
    prompts = default_prompts()
    assert prompts == default_prompts() and len(set(prompts)) == len(prompts)
    assert len({len(p) for p in prompts}) >= 8


def test_percentiles_and_result_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert LatencyStats.of([]).p50 is None
    r = make_result(0, 0.0, 10.0, [10.5, 10.75, 11.0], 11.25)
    assert r.ok and r.ttft_s == 0.5 and r.itl_s == [0.25, 0.25] and r.output_tokens == 3
    assert r.e2e_s == 1.25 and r.tpot_s == pytest.approx(0.375)
    with pytest.raises(ValueError):
        BenchConfig("http://x/v1", concurrency=0)


def test_waits_for_health_before_sending() -> None:
    state = FakeState(unready_polls=3)
    with serve_app(fake_openai_app(state)) as url:
        result = asyncio.run(run_load(bench(url, num_requests=2)))
    assert state.health_polls == 4 and result.summary.errors == 0


def test_a_server_that_never_gets_ready_is_a_clear_error() -> None:
    state = FakeState(unready_polls=10**6)
    with serve_app(fake_openai_app(state)) as url:
        with pytest.raises(RuntimeError, match="not ready after 0 s .HTTP 503"):
            asyncio.run(run_load(bench(url, ready_timeout_s=0.3)))
    assert state.requests == 0
