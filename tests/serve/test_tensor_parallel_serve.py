"""``longserve serve --tensor-parallel-size 2`` as a user runs it (real processes, gloo on the CPU): it answers
through the API; killing the follower rank ends the request in flight with an error, not a hang, and the
worker's restarted engine core (new ranks) serves the next request."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
from servers import unused_port, wait_until

MODEL = "tiny"


def _followers(serve: subprocess.Popen) -> list[psutil.Process]:
    """The follower rank processes under the serve process (engine core -> rank 1)."""
    children = psutil.Process(serve.pid).children(recursive=True)
    return [p for p in children if "longserve.engine.rank_process" in p.cmdline()]


def test_serve_with_two_ranks_answers_and_survives_a_dead_rank(tiny_llama_dir: str) -> None:
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    command = [sys.executable, "-m", "longserve.cli", "serve", "--model", tiny_llama_dir, "--model-name", MODEL,
               "--tensor-parallel-size", "2", "--kv-cache-memory-mb", "4", *args]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    serve = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{ports['port']}"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    try:

        def serving() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
            return False

        wait_until(serving, timeout=120, what="the model to be served by 2 ranks", poll_s=0.5)
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        assert first["usage"]["completion_tokens"] == 8
        (follower,) = _followers(serve)

        long = {**body, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60
        ) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it is generating
            follower.send_signal(signal.SIGKILL)
            started = time.monotonic()
            rest = list(lines)
        assert time.monotonic() - started < 30
        assert any('"error"' in line for line in rest), rest[-3:]

        wait_until(serving, timeout=120, what="a restarted engine core with new ranks", poll_s=0.5)
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]  # greedy, the same shards
        assert _followers(serve) and _followers(serve)[0].pid != follower.pid
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert not [p for p in psutil.pids() if p == follower.pid and psutil.Process(p).status() != "zombie"]
