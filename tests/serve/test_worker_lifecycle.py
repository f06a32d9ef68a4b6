"""Model worker lifecycle: registration and heartbeats against a small fake controller, running without a
reachable controller."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from servers import serve_app, unused_port, wait_until

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.worker_app import create_worker_app
from longserve.serve.worker_protocol import HeartBeatRequest, RegisterWorkerRequest, WorkerGenerateResponse

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> Iterator[EngineCoreClient]:
    engine = asyncio.run(
        EngineCoreClient.create(EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4), in_process=True)
    )
    yield engine
    engine.shutdown()


def _generate(url: str, max_tokens: int) -> WorkerGenerateResponse:
    body = {"model": MODEL, "prompt": "Hello", "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}
    response = httpx.post(f"{url}/worker_generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return WorkerGenerateResponse.model_validate(response.json())


class FakeController:
    """Records registrations and heartbeats; refuses the first registrations and can forget workers."""

    def __init__(self, refuse_first: int = 0) -> None:
        self.registrations: list[RegisterWorkerRequest] = []
        self.heart_beats: list[HeartBeatRequest] = []
        self.known: set[str] = set()
        self.refusals_left = refuse_first
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/register_worker")(self.register)
        self.app.post("/receive_heart_beat")(self.heart_beat)

    async def register(self, body: RegisterWorkerRequest):
        with self.lock:
            if self.refusals_left:
                self.refusals_left -= 1
                return JSONResponse({"message": "not ready"}, status_code=503)
            self.registrations.append(body)
            self.known.add(body.worker_address)
        return {}

    async def heart_beat(self, body: HeartBeatRequest):
        with self.lock:
            self.heart_beats.append(body)
            return {"exist": body.worker_address in self.known}


def test_worker_registers_heartbeats_and_registers_again(engine):
    controller = FakeController(refuse_first=2)
    with serve_app(controller.app) as controller_url:
        port = unused_port()
        config = ServeConfig(
            controller_address=controller_url,
            worker_address=f"http://127.0.0.1:{port}",
            heart_beat_interval_s=0.1,
            heart_beat_expiration_s=1.0,
        )
        app = create_worker_app(engine, config, MODEL)
        with serve_app(app, port=port):
            wait_until(lambda: len(controller.heart_beats) >= 3, what="registration and heartbeats")
            registration = controller.registrations[0]
            assert registration.worker_address == f"http://127.0.0.1:{port}"
            assert registration.worker_status.model_names == [MODEL]
            assert registration.worker_status.context_length == 512
            assert registration.worker_status.ready
            assert controller.heart_beats[0].worker_address == f"http://127.0.0.1:{port}"
            assert controller.heart_beats[0].ready

            with controller.lock:
                controller.known.clear()  # as after a controller restart
            link = app.state.worker.controller_link
            wait_until(lambda: link.num_registrations == 2, what="registering again")
            assert len(controller.registrations) == 2
        beats = len(controller.heart_beats)
        time.sleep(0.3)
        assert len(controller.heart_beats) == beats  # stopped with the app


def test_worker_without_a_reachable_controller_still_serves(engine):
    config = ServeConfig(
        controller_address=f"http://127.0.0.1:{unused_port()}",
        heart_beat_interval_s=0.2,
        heart_beat_expiration_s=1.0,
    )
    app = create_worker_app(engine, config, MODEL)
    with serve_app(app) as url:
        time.sleep(0.5)  # several failed registration attempts
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert _generate(url, 2).usage.completion_tokens == 2
        assert app.state.worker.controller_link.num_registrations == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
