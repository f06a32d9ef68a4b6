"""The launcher serves each part until cancelled, then shuts it down and frees its port."""

import asyncio

import httpx
import pytest
from servers import unused_port

from longserve.config import EngineConfig, ServeConfig
from longserve.serve import launcher


async def _serve_then_cancel(coro, url: str) -> dict:
    task = asyncio.create_task(coro)
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(600):
            assert not task.done(), task.exception() if task.done() else None
            try:
                body = (await client.get(f"{url}/health")).json()
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail(f"{url} never started listening")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/health")
    return body


def test_controller_serves_until_cancelled():
    config = ServeConfig(controller_port=unused_port())
    url = f"http://127.0.0.1:{config.controller_port}"
    assert asyncio.run(_serve_then_cancel(launcher.serve_controller(config), url)) == {"status": "ok"}


def test_api_server_serves_until_cancelled():
    config = ServeConfig(api_port=unused_port(), controller_address=f"http://127.0.0.1:{unused_port()}")
    url = f"http://127.0.0.1:{config.api_port}"
    assert asyncio.run(_serve_then_cancel(launcher.serve_api(config), url))


def test_worker_serves_until_cancelled_without_a_controller(tiny_llama_dir):
    config = ServeConfig(worker_port=unused_port(), controller_address="")
    engine_config = EngineConfig(model=tiny_llama_dir, kv_cache_memory_mb=4)
    url = f"http://127.0.0.1:{config.worker_port}"
    core = launcher.launch_engine(engine_config, config)
    assert asyncio.run(_serve_then_cancel(launcher.serve_worker(core, config), url))


def test_a_port_in_use_is_a_clear_startup_error():
    config = ServeConfig(controller_port=unused_port())

    async def scenario():
        first = asyncio.create_task(launcher.serve_controller(config))
        await asyncio.sleep(1.0)
        try:
            with pytest.raises(RuntimeError, match="port"):
                await launcher.serve_controller(config)
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)

    asyncio.run(scenario())


def test_model_display_name():
    assert launcher.model_display_name(None) == "SmolLM2-135M-Instruct"
    assert launcher.model_display_name("/models/Qwen3-0.6B/") == "Qwen3-0.6B"
    assert launcher.model_display_name("x/tiny.Q4_0.gguf") == "tiny.Q4_0"
