"""Worker admission: a full queue answers 429 at once; a queued request has its 200 and keep-alive lines
before it runs, so only a frozen worker goes silent; every place taken is given back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from servers import serve_app, wait_until

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.worker_app import create_worker_app
from longserve.serve.worker_protocol import ErrorInfo, WorkerStreamChunk

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[EngineCoreClient]:
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    yield engine
    engine.shutdown()


def _body(**sampling) -> dict:
    return {"model": MODEL, "prompt": "The quick brown fox", "sampling": {"temperature": 0, **sampling}}


def test_a_full_queue_is_429_and_a_queued_stream_keeps_alive(engine):
    config = ServeConfig(
        controller_address="", worker_concurrency=1, max_queue_len=1, worker_stream_keepalive_s=0.1
    )
    app = create_worker_app(engine, config, MODEL)
    worker = app.state.worker
    gate = threading.Event()
    step = engine.engine.step

    def held_step():
        gate.wait(10)
        return step()

    engine.engine.step = held_step
    lines: dict[str, list[bytes]] = {"running": [], "queued": []}

    def read(name: str) -> None:
        with httpx.stream("POST", f"{url}/worker_generate_stream", json=_body(max_tokens=3), timeout=30) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                lines[name].extend(chunk.split(b"\n")[:-1] if chunk.endswith(b"\n") else [chunk])

    try:
        with serve_app(app) as url:
            readers = [threading.Thread(target=read, args=(name,)) for name in lines]
            readers[0].start()
            wait_until(lambda: worker.in_flight == 1, what="the first request to run")
            readers[1].start()
            wait_until(lambda: worker.in_flight == 2, what="the second request to queue")
            time.sleep(0.5)
            assert lines["queued"].count(b"") >= 3  # keep-alive lines while it waits for the slot
            start = time.monotonic()
            response = httpx.post(f"{url}/worker_generate_stream", json=_body(), timeout=10)
            assert response.status_code == 429 and time.monotonic() - start < 1
            info = ErrorInfo.model_validate(response.json())
            assert info.code == "rate_limit_exceeded" and info.type == "rate_limit_error"
            assert worker.status().rejected == 1
            gate.set()
            for reader in readers:
                reader.join(timeout=30)
            for name, got in lines.items():
                chunks = [WorkerStreamChunk.model_validate_json(line) for line in got if line]
                assert chunks[-1].finished and chunks[-1].error is None, name
            wait_until(lambda: worker.in_flight == 0 and worker.semaphore._value == 1, what="places back")
    finally:
        gate.set()
        del engine.engine.step


def test_a_rejected_request_gives_its_place_back(engine):
    app = create_worker_app(
        engine, ServeConfig(controller_address="", worker_concurrency=1, max_queue_len=0), MODEL
    )
    worker = app.state.worker
    with serve_app(app) as url:
        for body in (_body(top_k=-5), {**_body(), "prompt": [10**7]}, _body(max_tokens=10**6)):
            assert httpx.post(f"{url}/worker_generate_stream", json=body, timeout=10).status_code == 400
            assert httpx.post(f"{url}/worker_generate", json=body, timeout=10).status_code == 400
        assert worker.in_flight == 0
        response = httpx.post(f"{url}/worker_generate", json=_body(max_tokens=2), timeout=30)
        assert response.status_code == 200 and worker.in_flight == 0
