"""Test helper: the whole serving stack in this process, each part a real uvicorn server on loopback.

    with Stack(model_dir, num_workers=2, heart_beat_interval_s=0.3) as stack:
        stack.client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)

Every ServeConfig option given applies to the controller, the workers and the API server alike.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
from servers import serve_app, unused_port, wait_until

from longserve.config import EngineConfig, ServeConfig
from longserve.engine.core_client import EngineCoreClient
from longserve.serve.api_server import create_api_app
from longserve.serve.controller_app import create_controller_app
from longserve.serve.worker_app import create_worker_app

MODEL = "tiny"


class Stack:
    """A controller, ``num_workers`` workers serving the tiny model, and an API server, each on loopback."""

    def __init__(
        self,
        model_dir: str | None,
        num_workers: int,
        engine_options: dict | None = None,
        model_name: str = MODEL,
        **serve_options,
    ) -> None:
        self.model_dir = model_dir  # None: the default model
        self.model_name = model_name  # what the workers call it
        self.engine_options = {"kv_cache_memory_mb": 4, **(engine_options or {})}
        self.num_workers = num_workers
        self.serve_options = serve_options
        self.exit_stack = contextlib.ExitStack()
        self.engines: list[EngineCoreClient] = []
        self.worker_urls: list[str] = []
        self.worker_servers: list[contextlib.AbstractContextManager] = []
        self.added: list[int] = []  # requests each worker's engine accepted
        self.workers: list = []  # each worker app's ModelWorker (admission state)

    def __enter__(self) -> Stack:
        controller_config = ServeConfig(**self.serve_options)
        self.controller_url = self.exit_stack.enter_context(
            serve_app(create_controller_app(controller_config))
        )
        for index in range(self.num_workers):
            self.start_worker(index)
        api_config = ServeConfig(controller_address=self.controller_url, **self.serve_options)
        self.api_url = self.exit_stack.enter_context(serve_app(create_api_app(api_config)))
        self.client = openai.OpenAI(base_url=f"{self.api_url}/v1", api_key="unused", max_retries=0)
        wait_until(lambda: len(self.live_workers()) == self.num_workers, what="workers to register")
        return self

    def start_worker(self, index: int) -> None:
        engine = asyncio.run(
            EngineCoreClient.create(
                EngineConfig(model=self.model_dir, **self.engine_options), in_process=True
            )
        )
        self.engines.append(engine)
        self.added.append(0)
        original_add = engine.engine.add_request

        def counting_add(request, _index=index, _original=original_add):
            self.added[_index] += 1
            return _original(request)

        engine.engine.add_request = counting_add
        port = unused_port()
        config = ServeConfig(
            controller_address=self.controller_url,
            worker_address=f"http://127.0.0.1:{port}",
            worker_port=port,
            **self.serve_options,
        )
        app = create_worker_app(engine, config, self.model_name)
        self.workers.append(app.state.worker)
        server = serve_app(app, port=port)
        self.worker_urls.append(server.__enter__())
        self.worker_servers.append(server)

    def kill_worker(self, index: int) -> None:
        self.worker_servers[index].__exit__(None, None, None)

    def live_workers(self) -> list[str]:
        response = httpx.post(f"{self.controller_url}/list_workers", json={}, timeout=5)
        return [w["worker_address"] for w in response.json()["workers"]]

    def __exit__(self, *exc_info) -> None:
        for server in self.worker_servers:
            with contextlib.suppress(Exception):
                server.__exit__(None, None, None)
        self.exit_stack.close()
        for engine in self.engines:
            engine.shutdown()


def all_blocks_free(engine: EngineCoreClient) -> bool:
    manager = engine.engine.block_manager
    return manager.num_free_blocks == manager.num_usable_blocks and not engine.engine.requests
