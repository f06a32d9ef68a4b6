"""Model worker over real HTTP on loopback: stream format, results, errors, embeddings, admission control
and cleanup after a client disconnects or an engine failure (the controller link: test_worker_lifecycle.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import httpx
import pytest
from servers import serve_app

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.worker import ModelWorker
from longserve.serve.worker_app import create_worker_app
from longserve.serve.worker_protocol import (
    ErrorInfo,
    WorkerGenerateResponse,
    WorkerStatus,
    WorkerStreamChunk,
)

MODEL = "tiny"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[EngineCoreClient]:
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def worker(engine: EngineCoreClient) -> Iterator[tuple[str, ModelWorker]]:
    """A stand-alone worker (no controller), default concurrency."""
    app = create_worker_app(engine, ServeConfig(controller_address=""), MODEL)
    with serve_app(app) as url:
        yield url, app.state.worker


@pytest.fixture(scope="module")
def narrow_worker(engine: EngineCoreClient) -> Iterator[tuple[str, ModelWorker]]:
    """A worker that admits two requests at once."""
    app = create_worker_app(engine, ServeConfig(controller_address="", worker_concurrency=2), MODEL)
    with serve_app(app) as url:
        yield url, app.state.worker


def _body(prompt=PROMPT, **sampling) -> dict:
    sampling.setdefault("temperature", 0)
    return {"model": MODEL, "prompt": prompt, "sampling": sampling}


def _stream(url: str, body: dict) -> list[WorkerStreamChunk]:
    with httpx.stream("POST", f"{url}/worker_generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [WorkerStreamChunk.model_validate_json(line) for line in response.iter_lines() if line]


def _joined(chunks: list[WorkerStreamChunk]) -> dict[int, dict]:
    """Per completion index: joined text, token ids, logprobs and the finish reason from the deltas."""
    joined: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.outputs:
            entry = joined.setdefault(
                delta.index, {"text": "", "token_ids": [], "logprobs": [], "finish": None}
            )
            entry["text"] += delta.text
            entry["token_ids"] += delta.token_ids
            entry["logprobs"] += delta.logprobs or []
            if delta.finish_reason is not None:
                assert entry["finish"] is None, "a completion's finish was reported twice"
                entry["finish"] = (delta.finish_reason, delta.stop_reason)
    return joined


def _generate(url: str, body: dict) -> WorkerGenerateResponse:
    response = httpx.post(f"{url}/worker_generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return WorkerGenerateResponse.model_validate(response.json())


def _error(response: httpx.Response, status: int) -> ErrorInfo:
    assert response.status_code == status, response.text
    info = ErrorInfo.model_validate(response.json())
    assert info.status == status and info.message
    return info


def _idle(engine: EngineCoreClient, worker: ModelWorker) -> bool:
    manager = engine.engine.block_manager
    return (
        not engine.engine.requests
        and manager.num_free_blocks == manager.num_usable_blocks
        and worker.in_flight == 0
    )


def _wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- generation ----------------------------------------------------------------------------------------------


def test_stream_lines_parse_and_join_to_the_generate_result(worker, engine):
    url, _ = worker
    body = _body(max_tokens=12, ignore_eos=True)
    chunks = _stream(url, body)
    first, last = chunks[0], chunks[-1]
    assert first.prompt_token_ids == engine.tokenizer.encode(PROMPT) and not first.outputs
    assert last.finished and last.error is None
    assert not any(c.finished for c in chunks[:-1]) and all(c.request_id == first.request_id for c in chunks)
    assert last.usage.prompt_tokens == len(first.prompt_token_ids)
    assert last.usage.completion_tokens == 12 and last.usage.total_tokens == 12 + len(first.prompt_token_ids)

    joined = _joined(chunks)
    result = _generate(url, body)
    assert [o.index for o in result.outputs] == [0] and result.prompt_token_ids == first.prompt_token_ids
    assert (
        joined[0]["text"] == result.outputs[0].text and joined[0]["token_ids"] == result.outputs[0].token_ids
    )
    assert len(result.outputs[0].token_ids) == 12 and result.usage == last.usage
    assert joined[0]["finish"] == ("length", None) and result.outputs[0].finish_reason == "length"


def test_n_2_streams_both_completions(worker):
    url, _ = worker
    body = _body(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    joined = _joined(_stream(url, body))
    assert sorted(joined) == [0, 1]
    assert all(len(entry["token_ids"]) == 6 and entry["finish"][0] == "length" for entry in joined.values())
    result = _generate(url, body)
    assert [o.index for o in result.outputs] == [0, 1]
    assert [o.token_ids for o in result.outputs] == [joined[0]["token_ids"], joined[1]["token_ids"]]


def test_stop_token_and_stop_string_finish_with_reason(worker):
    url, _ = worker
    free = _generate(url, _body(max_tokens=10, ignore_eos=True)).outputs[0]
    stop_id = free.token_ids[3]
    by_token = _generate(url, _body(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id])).outputs[0]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == stop_id
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]

    stop_text = free.text.strip()[2:5]
    assert stop_text, free.text
    chunks = _stream(url, _body(max_tokens=10, ignore_eos=True, stop=[stop_text]))
    joined = _joined(chunks)[0]
    assert joined["finish"] == ("stop", stop_text)
    assert stop_text not in joined["text"] and free.text.startswith(joined["text"])


def test_logprobs_carry_token_strings(worker, engine):
    url, _ = worker
    tokenizer = engine.tokenizer
    chunks = _stream(url, _body(max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1))
    entries = _joined(chunks)[0]["logprobs"]
    assert len(entries) == 5
    for entry in entries:
        assert entry.token == tokenizer.decode([entry.token_id], skip_special_tokens=False)
        assert entry.logprob <= 0 and 1 <= len(entry.top) <= 3
        assert all(t.token == tokenizer.decode([t.token_id], skip_special_tokens=False) for t in entry.top)
    prompt_ids = chunks[0].prompt_token_ids
    prompt_logprobs = chunks[0].prompt_logprobs
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt_ids)
    assert [e.token_id for e in prompt_logprobs[1:]] == prompt_ids[1:]
    # Greedy: the sampled token is the most likely one.
    assert all(e.top[0].token_id == e.token_id for e in entries)


# ---- rejections ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["worker_generate_stream", "worker_generate"])
def test_bad_sampling_value_is_a_400_naming_the_field(worker, endpoint):
    url, _ = worker
    info = _error(httpx.post(f"{url}/{endpoint}", json=_body(top_p=2.5), timeout=10), 400)
    assert info.param == "top_p" and "top_p" in info.message and info.type == "invalid_request_error"
    info = _error(httpx.post(f"{url}/{endpoint}", json=_body(temperature="hot"), timeout=10), 400)
    assert info.param == "temperature"
    info = _error(httpx.post(f"{url}/{endpoint}", json=_body(prompt=["a"]), timeout=10), 400)
    assert info.param == "prompt"
    info = _error(httpx.post(f"{url}/{endpoint}", content=b"{not json", timeout=10), 400)
    assert info.message


@pytest.mark.parametrize("endpoint", ["worker_generate_stream", "worker_generate"])
def test_prompt_over_context_is_a_400_with_the_numbers(worker, endpoint):
    url, _ = worker
    body = _body(prompt=[5] * 500, max_tokens=100)
    info = _error(httpx.post(f"{url}/{endpoint}", json=body, timeout=10), 400)
    assert "512" in info.message and "600" in info.message and info.code == "context_length_exceeded"
    info = _error(httpx.post(f"{url}/{endpoint}", json=_body(prompt=[10**9]), timeout=10), 400)
    assert info.param == "prompt"


def test_unknown_model_is_a_404(worker):
    url, _ = worker
    for endpoint, body in [
        ("worker_generate_stream", _body()),
        ("worker_generate", _body()),
        ("worker_get_embeddings", {"inputs": ["x"]}),
        ("count_token", {"prompt": "x"}),
        ("apply_chat_template", {"messages": []}),
    ]:
        info = _error(httpx.post(f"{url}/{endpoint}", json={**body, "model": "gpt-9"}, timeout=10), 404)
        assert info.param == "model" and "gpt-9" in info.message


# ---- status and small endpoints ------------------------------------------------------------------------------


def test_status_details_count_and_chat_template(worker, engine):
    url, _ = worker
    status = WorkerStatus.model_validate(httpx.post(f"{url}/worker_get_status", timeout=10).json())
    assert status.model_names == [MODEL] and status.context_length == 512
    assert status.queue_length == status.running == status.waiting == 0 and status.kv_cache_usage == 0.0
    details = httpx.post(f"{url}/model_details", json={}, timeout=10).json()
    assert details == {"model_names": [MODEL], "context_length": 512}

    count = httpx.post(f"{url}/count_token", json={"model": MODEL, "prompt": PROMPT}, timeout=10).json()
    assert count == {"count": len(engine.tokenizer.encode(PROMPT))}
    count = httpx.post(f"{url}/count_token", json={"model": MODEL, "prompt": [1, 2, 3]}, timeout=10).json()
    assert count == {"count": 3}

    messages = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": messages}
    prompt = httpx.post(f"{url}/apply_chat_template", json=body, timeout=10).json()["prompt"]
    assert prompt == engine.tokenizer.apply_chat_template(messages) and prompt.endswith("assistant\n")
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_embeddings_are_unit_norm_deterministic_and_distinct(worker, engine):
    url, _ = worker
    body = {"model": MODEL, "inputs": [PROMPT, "Paged memory splits the cache", [5, 6, 7, 8]]}
    first = httpx.post(f"{url}/worker_get_embeddings", json=body, timeout=30).json()
    again = httpx.post(f"{url}/worker_get_embeddings", json=body, timeout=30).json()
    vectors = first["embeddings"]
    assert len(vectors) == 3 and first == again
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1] != vectors[2]
    assert (
        first["prompt_tokens"]
        == len(engine.tokenizer.encode(PROMPT))
        + len(engine.tokenizer.encode("Paged memory splits the cache"))
        + 4
    )
    info = _error(httpx.post(f"{url}/worker_get_embeddings", json={**body, "inputs": [[]]}, timeout=10), 400)
    assert info.param == "inputs"
    info = _error(
        httpx.post(f"{url}/worker_get_embeddings", json={**body, "inputs": [[5] * 600]}, timeout=10), 400
    )
    assert "512" in info.message
    manager = engine.engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks


# ---- admission control and cleanup ---------------------------------------------------------------------------


def _run_concurrently(
    url: str, engine: EngineCoreClient, count: int, max_tokens: int
) -> tuple[list, int, int]:
    """``count`` streams at once; returns their chunks, the most requests seen inside the engine at once, and
    the largest queue_length the worker reported meanwhile."""
    peak_engine = peak_queue = 0

    async def one(client: httpx.AsyncClient, i: int) -> list[WorkerStreamChunk]:
        body = _body(prompt=[5 + i, 6, 7], max_tokens=max_tokens, ignore_eos=True)
        async with client.stream("POST", f"{url}/worker_generate_stream", json=body) as response:
            assert response.status_code == 200
            return [
                WorkerStreamChunk.model_validate_json(line) async for line in response.aiter_lines() if line
            ]

    async def watch(client: httpx.AsyncClient, done: asyncio.Event) -> None:
        nonlocal peak_engine, peak_queue
        polls = 0
        while not done.is_set():
            peak_engine = max(peak_engine, len(engine.engine.requests))
            if polls % 10 == 0:
                status = (await client.post(f"{url}/worker_get_status")).json()
                peak_queue = max(peak_queue, status["queue_length"])
            polls += 1
            await asyncio.sleep(0.002)

    async def main() -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(client, done))
            results = await asyncio.gather(*(one(client, i) for i in range(count)))
            done.set()
            await watcher
            return results

    results = asyncio.run(main())
    return results, peak_engine, peak_queue


def test_semaphore_bounds_requests_in_the_engine(narrow_worker, engine):
    url, worker = narrow_worker
    results, peak_engine, peak_queue = _run_concurrently(url, engine, 6, max_tokens=40)
    assert all(chunks[-1].finished and chunks[-1].usage.completion_tokens == 40 for chunks in results)
    assert peak_engine == 2, peak_engine
    assert peak_queue >= 3, peak_queue
    _wait_until(lambda: _idle(engine, worker), what="the worker to be idle")


def test_client_disconnect_mid_stream_aborts_the_request(narrow_worker, engine):
    url, worker = narrow_worker
    aborted = worker.num_aborted
    body = _body(max_tokens=None, ignore_eos=True)  # would run to the context length
    with httpx.stream("POST", f"{url}/worker_generate_stream", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert WorkerStreamChunk.model_validate_json(next(lines)).prompt_token_ids
        assert WorkerStreamChunk.model_validate_json(next(lines)).outputs
        assert engine.engine.requests  # still generating when we hang up
    _wait_until(lambda: _idle(engine, worker), timeout=5, what="the aborted request's blocks")
    assert worker.num_aborted == aborted + 1


def test_semaphore_is_fully_released_after_errors(narrow_worker, engine):
    url, worker = narrow_worker
    core = engine.engine
    # Rejections before and inside the semaphore, an unknown model, and a client that hangs up.
    _error(httpx.post(f"{url}/worker_generate_stream", json=_body(top_k=-5), timeout=10), 400)
    for _ in range(3):
        _error(httpx.post(f"{url}/worker_generate_stream", json=_body(prompt=[5] * 600), timeout=10), 400)
        _error(httpx.post(f"{url}/worker_generate", json=_body(prompt=[5] * 600), timeout=10), 400)
    _error(httpx.post(f"{url}/worker_generate", json={**_body(), "model": "nope"}, timeout=10), 404)
    with httpx.stream(
        "POST", f"{url}/worker_generate_stream", json=_body(max_tokens=300, ignore_eos=True)
    ) as r:
        next(r.iter_lines())

    # An engine failure is the stream's last line, mid-stream or before the first output (the worker has sent
    # its 200 and keep-alives by then; the API server turns a first-line error into the HTTP status).
    original_step, calls = core.step, []

    def failing_step(fail_at: int):
        def step():
            calls.append(1)
            if len(calls) >= fail_at:
                raise RuntimeError("injected failure")
            return original_step()

        return step

    try:
        core.step = failing_step(4)
        chunks = _stream(url, _body(max_tokens=50, ignore_eos=True))
        assert chunks[-1].finished and chunks[-1].error.type == "server_error"
        assert "injected failure" in chunks[-1].error.message and chunks[-1].usage is None
        calls.clear()
        core.step = failing_step(1)
        (only,) = _stream(url, _body())
        assert only.finished and only.error.status == 500 and "injected failure" in only.error.message
    finally:
        del core.step  # back to the class's method
    _wait_until(lambda: _idle(engine, worker), what="the worker to be idle")

    # Both slots are free again: two requests run in the engine at the same time.
    results, peak_engine, _ = _run_concurrently(url, engine, 2, max_tokens=30)
    assert peak_engine == 2 and all(chunks[-1].finished for chunks in results)
