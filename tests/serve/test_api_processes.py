"""`longserve api --api-server-count 2`: two API server processes behind one port, each with its own stream to
every worker (fake workers and a fake controller in this process, the API servers as real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_fakes import MODEL, create_fake_controller, create_fake_worker
from servers import serve_app, unused_port, wait_until

BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 3}


def _api_servers(pid: int) -> list[int]:
    """The API server processes: the children of the `api` process."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _peers(worker_app) -> int:
    """How many API server processes hold a stream to this worker."""
    return len(worker_app.state.worker.stream_server._peers)


def _ask(url: str, times: int) -> None:
    for _ in range(times):  # a new connection each time: the kernel spreads them over the processes
        with httpx.Client(timeout=20) as client:
            response = client.post(f"{url}/v1/completions", json=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == "abc"


def test_two_api_processes_share_a_port_survive_one_dying_and_find_a_new_worker() -> None:
    first, later = create_fake_worker(), create_fake_worker()
    with serve_app(first) as first_url, serve_app(later) as later_url:
        controller = create_fake_controller([first_url])
        with serve_app(controller) as controller_url:
            port = unused_port()
            api_url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "longserve.cli", "api", "--port", str(port)]
            command += ["--controller-address", controller_url, "--api-server-count", "2"]
            api = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
            try:
                wait_until(lambda: len(_api_servers(api.pid)) == 2, timeout=30, what="two API processes")
                wait_until(lambda: _status(f"{api_url}/live") == 200, timeout=60, what="the API to listen")
                _ask(api_url, 12)
                assert _peers(first) == 2, "both processes should have streamed from the worker"

                controller.state.workers[:] = [later_url, first_url]  # a worker that joined later
                _ask(api_url, 12)
                assert _peers(later) == 2, "both processes should find the new worker"

                os.kill(_api_servers(api.pid)[0], signal.SIGKILL)
                time.sleep(0.2)
                _ask(api_url, 8)  # every new connection lands on the process still serving
                assert api.poll() is None
            finally:
                api.send_signal(signal.SIGINT)
                _, stderr = api.communicate(timeout=30)
            assert api.returncode == 0, stderr
            assert "Traceback" not in stderr, stderr


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None
