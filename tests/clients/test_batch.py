"""The batch client against a fake OpenAI server on loopback (answers, retries, bad lines, resume) and against a
real `longserve serve` killed midway (SIGINT, SIGKILL) and rerun to completion."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from rich.console import Console

from longserve.clients.batch import BatchAuthError, OutputFileError, main, run_batch
from longserve.clients.batch_io import OutputWriter
from longserve.clients.retry import RetryPolicy, parse_retry_after

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from servers import serve_app, unused_port  # noqa: E402  (tests/serve/servers.py, shared test helper)

FAST = {"backoff_base": 0.001, "ready_timeout": 5.0}


@dataclass
class FakeState:
    """What the fake server saw, and how it behaves beyond what each request's ``x_fake`` asks for."""

    attempts: dict[str, list[float]] = field(default_factory=dict)  # x_fake.key -> arrival times
    delay_s: float = 0.0  # every answer waits this long
    in_flight: int = 0
    max_in_flight: int = 0
    health_polls: int = 0
    unready_polls: int = 0  # /health answers 503 this many times first
    health_ready_status: int = 404  # then this: 404 = a server without /health, as many non-longserve ones
    api_key: str | None = None  # when set, a request without this Bearer token gets 401


def fake_openai_app(state: FakeState) -> FastAPI:
    """Deterministic OpenAI-shaped answers. A body's ``x_fake`` asks for trouble: ``statuses`` answered in turn
    on the first attempts (``retry_after`` sent with them), ``always`` on every attempt, ``sleep_first`` seconds
    of silence on the first attempt, ``html`` a non-JSON 502 page."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        state.health_polls += 1
        ready = state.health_polls > state.unready_polls
        return JSONResponse({}, status_code=state.health_ready_status if ready else 503)

    async def answer(request: Request, kind: str):
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            error = {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        body = await request.json()
        fake = body.get("x_fake") or {}
        key = fake.get("key", json.dumps(body, sort_keys=True))
        seen = state.attempts.setdefault(key, [])
        seen.append(time.monotonic())
        attempt = len(seen) - 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.delay_s + (fake.get("sleep_first", 0) if attempt == 0 else 0))
            statuses = fake.get("statuses", [])
            status = fake.get("always") or (statuses[attempt] if attempt < len(statuses) else 200)
            if fake.get("html"):
                return PlainTextResponse("<html>bad gateway</html>", status_code=502)
            if status != 200:
                headers = {"Retry-After": str(fake["retry_after"])} if "retry_after" in fake else None
                error = {"message": f"fake {status}", "type": "server_error", "param": None, "code": None}
                return JSONResponse({"error": error}, status_code=status, headers=headers)
            if body.get("model") == "missing":
                error = {
                    "message": "no such model",
                    "type": "invalid_request_error",
                    "code": "model_not_found",
                }
                return JSONResponse({"error": error}, status_code=404)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            if kind == "chat":
                text = "echo " + body["messages"][-1]["content"]
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                return {
                    "id": f"chatcmpl-{key}",
                    "object": "chat.completion",
                    "choices": [choice],
                    "usage": usage,
                }
            if kind == "completion":
                choice = {"index": 0, "text": "echo " + body["prompt"], "finish_reason": "stop"}
                return {"id": f"cmpl-{key}", "object": "text_completion", "choices": [choice], "usage": usage}
            embedding = {"object": "embedding", "index": 0, "embedding": [float(len(body["input"])), 1.0]}
            return {"object": "list", "data": [embedding], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        finally:
            state.in_flight -= 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await answer(request, "embedding")

    return app


def chat_line(custom_id: str, content: str = "hi", **fake: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    if fake:
        body["x_fake"] = {"key": custom_id} | fake
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_input(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_output(path: Path) -> dict[str, dict[str, Any]]:
    """custom_id -> output line; fails on a line that is not JSON or on a custom_id written twice."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id was written twice"
    return by_id


def batch(inp: Path, out: Path, url: str, **options: Any):
    return asyncio.run(run_batch(inp, out, base_url=f"{url}/v1", **(FAST | options)))


def test_answers_every_endpoint_in_openai_batch_output_shape(tmp_path: Path) -> None:
    lines = [
        chat_line("c1", "hello"),
        {
            "custom_id": "p1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "x"},
        },
        {
            "custom_id": "e1",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": "abc"},
        },
    ]
    inp, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        summary = batch(inp, out, url)
    assert (summary.succeeded, summary.failed, summary.skipped, summary.bad_lines) == (3, 0, 0, [])
    assert summary.ok and summary.total_tokens == 11 and summary.tokens_per_s > 0
    got = read_output(out)
    assert set(got) == {"c1", "p1", "e1"}
    for line in got.values():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
    assert got["c1"]["response"]["body"]["choices"][0]["message"]["content"] == "echo hello"
    assert got["c1"]["response"]["request_id"] == "chatcmpl-" + json.dumps(lines[0]["body"], sort_keys=True)
    assert got["p1"]["response"]["body"]["choices"][0]["text"] == "echo x"
    assert got["e1"]["response"]["body"]["data"][0]["embedding"] == [3.0, 1.0]
    assert state.health_polls == 1  # a 404 on /health (no such route) counts as ready


def test_progress_bar_shows_done_failed_and_tokens_per_s(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line("a"), chat_line("b", always=400), "oops"])
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with serve_app(fake_openai_app(FakeState())) as url:
        summary = batch(inp, tmp_path / "out.jsonl", url, progress=True, console=console)
    assert (summary.succeeded, summary.failed, len(summary.bad_lines)) == (1, 1, 1)
    text = screen.getvalue()
    assert "3/3" in text and "1 failed" in text and "tok/s" in text and "bad input line 3" in text


def test_concurrency_is_bounded_and_reached(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line(f"r{i}", f"n{i}") for i in range(24)])
    state = FakeState(delay_s=0.03)
    with serve_app(fake_openai_app(state)) as url:
        summary = batch(inp, tmp_path / "out.jsonl", url, concurrency=4)
    assert summary.succeeded == 24 and state.max_in_flight == 4
    assert len(read_output(tmp_path / "out.jsonl")) == 24


def test_429_with_retry_after_and_503s_are_retried_until_200(tmp_path: Path) -> None:
    line = chat_line("r", statuses=[429, 503, 503], retry_after="0.3")
    inp, out = write_input(tmp_path / "in.jsonl", [line]), tmp_path / "out.jsonl"
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        summary = batch(inp, out, url, max_retries=5)
    times = state.attempts["r"]
    assert len(times) == 4 and summary.retries == 3 and summary.ok
    assert all(later - earlier >= 0.29 for earlier, later in zip(times, times[1:], strict=False))
    assert read_output(out)["r"]["response"]["status_code"] == 200


def test_a_server_that_always_503s_ends_in_an_error_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line("down", always=503), chat_line("fine")])
    out = tmp_path / "out.jsonl"
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        options = ["--max-retries", "2", "--backoff-base", "0.001", "--no-progress"]
        rc = main([str(inp), "-o", str(out), "--base-url", f"{url}/v1", *options])
    assert rc == 1
    assert len(state.attempts["down"]) == 3
    got = read_output(out)
    assert got["down"]["response"] is None
    assert got["down"]["error"]["code"] == "http_503" and "3 attempts" in got["down"]["error"]["message"]
    assert got["fine"]["response"]["status_code"] == 200
    assert "1 done, 1 failed" in capsys.readouterr().err


def test_a_timeout_is_retried(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line("slow", sleep_first=0.6)])
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        summary = batch(inp, tmp_path / "out.jsonl", url, timeout=0.2)
    assert summary.ok and summary.retries == 1 and len(state.attempts["slow"]) == 2


def test_400_and_404_are_written_with_their_status_and_not_retried(tmp_path: Path) -> None:
    missing = chat_line("404")
    missing["body"]["model"] = "missing"
    inp = write_input(
        tmp_path / "in.jsonl", [chat_line("400", always=400), missing, chat_line("html", html=1)]
    )
    out = tmp_path / "out.jsonl"
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        summary = batch(inp, out, url, max_retries=1)
    assert (summary.succeeded, summary.failed) == (0, 3) and not summary.ok
    got = read_output(out)
    assert got["400"]["error"] is None and got["400"]["response"]["status_code"] == 400
    assert got["400"]["response"]["body"]["error"]["message"] == "fake 400"
    assert len(state.attempts["400"]) == 1
    assert got["404"]["response"]["status_code"] == 404
    assert got["404"]["response"]["body"]["error"]["code"] == "model_not_found"
    # a 502 HTML page is retried, then given up on; its text is kept in the message
    assert got["html"]["error"]["code"] == "http_502" and "bad gateway" in got["html"]["error"]["message"]


def test_bad_input_lines_are_reported_with_line_numbers_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    get = chat_line("get") | {"method": "GET"}
    lines: list[dict[str, Any] | str] = [
        chat_line("a"),  # 1
        "{not json",  # 2
        {"method": "POST", "url": "/v1/completions", "body": {}},  # 3: no custom_id
        chat_line("x") | {"custom_id": 7},  # 4
        chat_line("u") | {"url": "/v1/images/generations"},  # 5
        get,  # 6
        chat_line("b") | {"body": ["not", "an", "object"]},  # 7
        "",  # 8: blank, ignored
        chat_line("a", "again"),  # 9: duplicate
        chat_line("s")
        | {"body": {"model": "m", "prompt": "x", "stream": True}, "url": "/v1/completions"},  # 10
        chat_line("c"),  # 11
    ]
    inp, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    with serve_app(fake_openai_app(FakeState())) as url:
        rc = main([str(inp), "-o", str(out), "--base-url", f"{url}/v1", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    expected = {
        2: "invalid JSON",
        3: "missing custom_id",
        4: "custom_id must be a non-empty string",
        5: "unsupported url",
        6: "method must be",
        7: "body must be a JSON object",
        9: "duplicate custom_id 'a' (first on line 1)",
        10: "stream is not supported",
    }
    for line_no, reason in expected.items():
        assert any(f"bad input line {line_no}:" in row and reason in row for row in err.splitlines()), line_no
    assert "bad input lines: 2, 3, 4, 5, 6, 7, 9, 10" in err
    assert set(read_output(out)) == {"a", "c"}
    assert read_output(out)["a"]["response"]["body"]["choices"][0]["message"]["content"] == "echo hi"


def test_resume_cuts_a_torn_last_line_and_sends_only_what_is_missing(tmp_path: Path) -> None:
    ids = [f"r{i}" for i in range(8)]
    inp, out = write_input(tmp_path / "in.jsonl", [chat_line(i) for i in ids]), tmp_path / "out.jsonl"
    state = FakeState()
    with serve_app(fake_openai_app(state)) as url:
        assert batch(inp, out, url).succeeded == 8
        # As a SIGKILL can leave it: five whole lines and half of the sixth, without its newline.
        lines = out.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
        sent_before = sum(len(times) for times in state.attempts.values())
        summary = batch(inp, out, url)
    assert summary.skipped == 5 and summary.succeeded == 3 and summary.ok
    assert summary.torn_bytes == len(lines[5]) // 2
    assert sum(len(times) for times in state.attempts.values()) - sent_before == 3
    got = read_output(out)
    assert set(got) == set(ids) and all(line["response"]["status_code"] == 200 for line in got.values())
    assert out.read_bytes().startswith(b"".join(lines[:5]))  # the whole lines are kept as they were


def test_a_finished_output_needs_no_server(tmp_path: Path) -> None:
    inp, out = write_input(tmp_path / "in.jsonl", [chat_line("a")]), tmp_path / "out.jsonl"
    with serve_app(fake_openai_app(FakeState())) as url:
        batch(inp, out, url)
    summary = batch(inp, out, f"http://127.0.0.1:{unused_port()}")  # nothing listens there
    assert summary.skipped == 1 and summary.ok and len(read_output(out)) == 1


def test_retry_failed_sends_failed_answers_again(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line("flaky", statuses=[503, 503]), chat_line("ok")])
    out = tmp_path / "out.jsonl"
    with serve_app(fake_openai_app(FakeState())) as url:
        first = batch(inp, out, url, max_retries=1)
        assert (first.succeeded, first.failed) == (1, 1)
        again = batch(inp, out, url)  # failed answers count as answered unless asked otherwise
        assert again.skipped == 2 and again.skipped_failed == 1 and not again.ok
        retried = batch(inp, out, url, retry_failed=True)  # the server's third answer is a 200
    assert retried.ok and retried.succeeded == 1 and retried.skipped == 1
    got = read_output(out)
    assert set(got) == {"flaky", "ok"} and got["flaky"]["response"]["status_code"] == 200


def test_stop_event_leaves_the_rest_for_a_rerun(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat_line(f"r{i}") for i in range(30)])
    out = tmp_path / "out.jsonl"
    state = FakeState(delay_s=0.05)

    async def stopped_midway():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        return await run_batch(inp, out, base_url=f"{url}/v1", concurrency=2, stop=stop, **FAST)

    with serve_app(fake_openai_app(state)) as url:
        first = asyncio.run(stopped_midway())
        assert first.interrupted and not first.ok and 0 < first.succeeded < 30
        assert len(read_output(out)) == first.succeeded  # every request on the wire was finished and written
        rest = batch(inp, out, url)
    assert rest.ok and rest.skipped == first.succeeded and rest.succeeded == 30 - first.succeeded
    assert len(read_output(out)) == 30


def test_api_key_is_sent_as_bearer_and_a_refused_key_stops_the_run(tmp_path: Path) -> None:
    inp, out = (
        write_input(tmp_path / "in.jsonl", [chat_line(f"r{i}") for i in range(5)]),
        tmp_path / "out.jsonl",
    )
    with serve_app(fake_openai_app(FakeState(api_key="sesame"))) as url:
        with pytest.raises(BatchAuthError, match="HTTP 401"):
            batch(inp, out, url, api_key="wrong")
        assert out.read_text() == ""  # no line says "401" for requests a good key would answer
        assert batch(inp, out, url, api_key="sesame").succeeded == 5


def test_waits_for_health_and_a_server_never_ready_is_an_error(tmp_path: Path) -> None:
    inp, out = write_input(tmp_path / "in.jsonl", [chat_line("a")]), tmp_path / "out.jsonl"
    state = FakeState(unready_polls=2, health_ready_status=200)
    with serve_app(fake_openai_app(state)) as url:
        assert batch(inp, out, url).ok and state.health_polls == 3
    never = FakeState(unready_polls=10**6)
    with serve_app(fake_openai_app(never)) as url:
        with pytest.raises(RuntimeError, match="not ready"):
            batch(write_input(tmp_path / "in2.jsonl", [chat_line("b")]), out, url, ready_timeout=0.3)
    assert never.attempts == {}


def test_output_that_is_not_batch_output_is_refused(tmp_path: Path) -> None:
    inp, out = write_input(tmp_path / "in.jsonl", [chat_line("a")]), tmp_path / "out.jsonl"
    out.write_text("this is not json\n")
    with pytest.raises(OutputFileError, match="line 1"):
        batch(inp, out, "http://127.0.0.1:9")
    assert out.read_text() == "this is not json\n"


def test_two_runs_cannot_append_to_one_output(tmp_path: Path) -> None:
    async def both() -> None:
        first = OutputWriter(tmp_path / "out.jsonl")
        await first.open()
        try:
            with pytest.raises(OutputFileError, match="another batch run"):
                await OutputWriter(tmp_path / "out.jsonl").open()
        finally:
            await first.close()

    asyncio.run(both())


def test_missing_input_is_an_error_and_creates_no_output(tmp_path: Path, capsys) -> None:
    rc = main([str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--no-progress"])
    assert rc == 1 and "no input file" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_backoff_is_full_jitter_and_retry_after_wins() -> None:
    policy = RetryPolicy(max_retries=3, base_s=0.5, cap_s=4.0, max_retry_after_s=10.0)
    rng = random.Random(0)
    for attempt, window in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (8, 4.0)]:
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= window for d in delays) and max(delays) > 0.8 * window
    assert policy.delay(0, 7.0) == 7.0 and policy.delay(0, 60.0) == 10.0
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None and parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert [s for s in range(400, 600) if policy.should_retry_status(s)] == [429, 500, 502, 503, 504]


# --- against a real `longserve serve` (the default model) -------------------------------------------------------

REAL_LINES = 50


@pytest.fixture(scope="module")
def real_server() -> str:
    """`longserve serve` with its default model on free loopback ports; yields the OpenAI base URL."""
    port = unused_port()
    ports = [f"--port={port}", f"--controller-port={unused_port()}", f"--worker-port={unused_port()}"]
    command = [sys.executable, "-m", "longserve.cli", "serve", *ports]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "longserve serve was not ready in time"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=45)  # a drain of up to 30 s (requests of the killed clients may still run)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _real_lines() -> list[dict[str, Any]]:
    lines = []
    for i in range(REAL_LINES):
        if i % 5 == 3:
            body = {"model": "SmolLM2-135M-Instruct", "prompt": f"Count to {i}:", "max_tokens": 4}
            lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
        elif i % 5 == 4:
            body = {"model": "SmolLM2-135M-Instruct", "input": f"sentence number {i}"}
            lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/embeddings", "body": body})
        else:
            line = chat_line(f"req-{i}", f"Say a word about the number {i}.")
            line["body"] |= {"model": "SmolLM2-135M-Instruct", "temperature": 0}
            lines.append(line)
    return lines


def _line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _start_batch(inp: Path, out: Path, base_url: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "longserve.cli", "batch", str(inp), "-o", str(out)]
    command += ["--base-url", base_url, "-c", "8", "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, out: Path, lines: int, sig: signal.Signals) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while _line_count(out) < lines:
        assert process.poll() is None, f"the batch ended before it was killed: {process.communicate()}"
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.01)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_killed_with_sigint_and_sigkill_then_rerun_answers_each_line_once(
    real_server, tmp_path: Path
) -> None:
    inp, out = write_input(tmp_path / "in.jsonl", _real_lines()), tmp_path / "out.jsonl"

    rc, err = _kill_when(_start_batch(inp, out, real_server), out, 5, signal.SIGINT)
    assert rc == 130 and "rerun the same command to resume" in err, err
    after_sigint = _line_count(out)
    assert after_sigint < REAL_LINES
    assert len(read_output(out)) == after_sigint  # stopped cleanly: whole lines, each id once

    rc, _ = _kill_when(_start_batch(inp, out, real_server), out, after_sigint + 5, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert _line_count(out) < REAL_LINES

    rerun = _start_batch(inp, out, real_server)
    _, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    got = read_output(out)
    assert len(out.read_text().splitlines()) == REAL_LINES
    assert set(got) == {f"req-{i}" for i in range(REAL_LINES)}
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in got.values())
    assert "skipped as already answered" in err
