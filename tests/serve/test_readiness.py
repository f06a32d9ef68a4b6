"""Readiness as a script or an orchestrator sees it, on real processes: `/health` is 200 only when a request
would be served, `/live` answers whenever the process does, a normal start logs nothing alarming, and a worker
whose engine core is down or gone is not dispatched to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from fastapi import FastAPI
from servers import unused_port, wait_until

from longserve.serve.launcher import AppSpec, run_apps

MODEL = "tiny"
POLL_S = 0.01

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _start(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "longserve.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _stop(process: subprocess.Popen) -> tuple[str, str]:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def _status(url: str) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code
    return None


def _models(api_url: str) -> list[str] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        return [m["id"] for m in httpx.get(f"{api_url}/v1/models", timeout=2).json()["data"]]
    return None


@contextlib.contextmanager
def _busy_neighbour():
    """A process spinning on a core, as on a loaded machine: it widens any window between 'up' and 'ready'."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def _serve_and_watch(model_dir: str) -> str:
    """Start `serve`, poll /health every 10 ms until 200; each 200 is checked against /v1/models at once and the
    first request after it must succeed. Returns the server's stderr."""
    port = unused_port()
    api_url = f"http://127.0.0.1:{port}"
    process = _start(
        "serve", "--model", model_dir, "--model-name", MODEL, "--port", str(port),
        "--controller-port", str(unused_port()), "--worker-port", str(unused_port()),
    )  # fmt: skip
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "serve exited during start-up"
            assert time.monotonic() < deadline, f"never ready; /health answered {set(statuses)}"
            response = None
            with contextlib.suppress(httpx.TransportError):
                response = httpx.get(f"{api_url}/health", timeout=2)
            statuses.append(None if response is None else response.status_code)
            if response is not None and response.status_code == 200:
                assert _models(api_url) == [MODEL], "/health said ready while /v1/models was empty"
                break
            if response is not None:  # not ready yet: OpenAI's error shape, with the reason
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "no_worker", response.text
            time.sleep(POLL_S)
        body = {"model": MODEL, "prompt": "ready?", "max_tokens": 2}
        response = httpx.post(f"{api_url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert _status(f"{api_url}/live") == 200
    finally:
        _, stderr = _stop(process)
    return stderr


def test_serve_is_never_healthy_before_it_can_serve_and_starts_quietly(tiny_llama_dir):
    stderrs = [_serve_and_watch(tiny_llama_dir)]
    with _busy_neighbour():
        stderrs += [_serve_and_watch(tiny_llama_dir) for _ in range(2)]
    for stderr in stderrs:
        alarming = [line for line in stderr.splitlines() if " WARNING " in line or " ERROR " in line]
        assert not alarming, alarming
        assert "Traceback" not in stderr, stderr


def test_separate_workers_are_listed_only_when_ready_and_health_follows_the_last_worker(tiny_llama_dir):
    controller_port, api_port, worker_port = unused_port(), unused_port(), unused_port()
    controller_url, api_url = f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{api_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    beat = ["--heart-beat-interval", "0.3"]
    processes = [
        _start("controller", "--port", str(controller_port), *beat, "--heart-beat-expiration", "2"),
        _start("api", "--port", str(api_port), "--controller-address", controller_url, *beat),
    ]
    try:
        wait_until(lambda: _status(f"{api_url}/live") == 200, timeout=30, what="the API server")
        wait_until(lambda: _status(f"{controller_url}/live") == 200, timeout=30, what="the controller")
        assert _status(f"{api_url}/health") == 503  # no worker yet
        worker = _start(
            "worker", "--model", tiny_llama_dir, "--model-name", MODEL, "--port", str(worker_port),
            "--controller-address", controller_url, *beat, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(worker)
        # Whenever the controller lists the model, the worker already answers /health with 200.
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the worker never registered"
            listed = httpx.post(f"{controller_url}/list_models", timeout=2).json()["models"]
            if listed:
                assert _status(f"{worker_url}/health") == 200, "listed while not ready"
                break
            time.sleep(POLL_S)
        assert _status(f"{api_url}/health") == 200

        # The engine core dies: the worker says 503 and is not listed until the core is back.
        core = next(
            c for c in psutil.Process(worker.pid).children() if "core_process" in " ".join(c.cmdline())
        )
        core.kill()
        wait_until(lambda: _status(f"{worker_url}/health") == 503, timeout=5, what="worker /health 503")
        wait_until(
            lambda: _status(f"{api_url}/health") == 503, timeout=5, what="API /health 503 while restarting"
        )
        wait_until(lambda: _status(f"{worker_url}/health") == 200, timeout=60, what="the core restarted")
        wait_until(lambda: _status(f"{api_url}/health") == 200, timeout=5, what="API /health 200 again")
        body = {"model": MODEL, "prompt": "back?", "max_tokens": 2}
        assert httpx.post(f"{api_url}/v1/completions", json=body, timeout=30).status_code == 200

        # The only worker dies: the API's readiness turns 503 within the heartbeat expiry.
        worker.kill()
        worker.wait()
        killed = time.monotonic()
        wait_until(lambda: _status(f"{api_url}/health") == 503, timeout=10, what="API /health 503")
        assert time.monotonic() - killed < 2 + 1.5
        assert _status(f"{api_url}/live") == 200
    finally:
        for process in reversed(processes):
            _stop(process)


def test_a_fatal_engine_failure_stops_the_servers_with_its_reason():
    app = FastAPI()
    started = time.monotonic()

    def fatal() -> str | None:
        return "the engine core died 4 times in a row" if time.monotonic() - started > 0.5 else None

    spec = AppSpec("worker", app, "127.0.0.1", unused_port())
    with pytest.raises(RuntimeError, match="died 4 times"):
        asyncio.run(run_apps([spec], fatal=fatal))
