"""Real processes on loopback: a frozen worker (SIGSTOP) costs only the streams it held, within the read timeout,
Ctrl-C with streams in flight ends every one of them and exits within seconds, and a killed worker leaves no
engine core behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
from burst import burst, check_burst
from servers import unused_port, wait_until

MODEL = "tiny"
STREAM_TIMEOUT_S = 2.0
LONG_STREAM = {
    "model": MODEL,
    "prompt": "Once upon a time",
    "max_tokens": 480,
    "ignore_eos": True,
    "stream": True,
}

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "longserve.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class StreamResult:
    first_chunk: threading.Event = field(default_factory=threading.Event)
    texts: int = 0
    finish_reason: str | None = None
    error: dict | None = None
    done: bool = False  # saw [DONE]
    ended_at: float | None = None
    exception: BaseException | None = None


def _sse_lines(response: httpx.Response):
    """SSE lines split on newlines only: httpx's iter_lines also splits at U+2028 or U+0085, which JSON
    leaves unescaped inside token texts."""
    buffer = b""
    for data in response.iter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode()
    if buffer:
        yield buffer.decode()


def _stream(url: str, result: StreamResult, body: dict = LONG_STREAM) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in _sse_lines(response):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]
                    continue
                choice = event["choices"][0]
                result.texts += 1
                result.first_chunk.set()
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except BaseException as exc:  # noqa: BLE001 - recorded for the test to assert on
        result.exception = exc
    finally:
        result.ended_at = time.monotonic()
        result.first_chunk.set()


def _start_streams(url: str, count: int) -> tuple[list[StreamResult], list[threading.Thread]]:
    results = [StreamResult() for _ in range(count)]
    threads = [threading.Thread(target=_stream, args=(url, r), daemon=True) for r in results]
    for thread in threads:
        thread.start()
    for result in results:
        assert result.first_chunk.wait(30), "a stream never started"
    return results, threads


def _queue_length(worker_url: str) -> int:
    return httpx.post(f"{worker_url}/worker_get_status", timeout=5).json()["queue_length"]


def test_a_frozen_worker_fails_only_its_streams_within_the_read_timeout(tiny_llama_dir):
    ports = [unused_port() for _ in range(4)]
    controller_url, api_url = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    worker_urls = [f"http://127.0.0.1:{port}" for port in ports[2:]]
    beat = ["--heart-beat-interval", "0.5"]
    processes = [_start("controller", "--port", str(ports[0]), *beat, "--heart-beat-expiration", "30")]
    try:
        for port in ports[2:]:
            processes.append(
                _start(
                    "worker",
                    "--model",
                    tiny_llama_dir,
                    "--model-name",
                    MODEL,
                    "--port",
                    str(port),
                    "--controller-address",
                    controller_url,
                    "--worker-stream-keepalive",
                    "0.3",
                    *beat,
                )  # fmt: skip
            )
        processes.append(
            _start(
                "api",
                "--port",
                str(ports[1]),
                "--controller-address",
                controller_url,
                "--worker-stream-timeout",
                str(STREAM_TIMEOUT_S),
                *beat,
            )  # fmt: skip
        )

        def registered() -> int:
            with contextlib.suppress(httpx.HTTPError):
                return len(httpx.post(f"{controller_url}/list_workers", timeout=2).json()["workers"])
            return 0

        wait_until(lambda: registered() == 2, timeout=60, what="both workers to register")
        wait_until(lambda: httpx.get(f"{api_url}/health", timeout=2).status_code == 200, timeout=30)

        results, threads = _start_streams(api_url, 6)
        frozen_index = max(range(2), key=lambda i: _queue_length(worker_urls[i]))
        assert _queue_length(worker_urls[frozen_index]) > 0
        frozen = processes[1 + frozen_index]
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The live worker's streams take what its 480 tokens take on this box; the frozen ones are timed below.
        deadline = time.monotonic() + 90
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hanging = [
            (r.texts, r.error, r.finish_reason) for r, t in zip(results, threads, strict=True) if t.is_alive()
        ]
        assert not hanging, f"streams still open 90 s after the freeze (texts, error, finish): {hanging}"
        assert all(r.exception is None and r.done for r in results), [r.exception for r in results]
        failed = [r for r in results if r.error is not None]
        assert failed, "no stream was on the frozen worker"
        for r in failed:
            assert r.error["code"] == "worker_failed" and "read timeout" in r.error["message"]
            assert r.ended_at - stopped_at < STREAM_TIMEOUT_S + 3
        for r in results:
            if r.error is None:
                assert r.finish_reason == "length"

        # New requests go to the live worker: the frozen one was reported and is skipped.
        for i in range(6):
            start = time.monotonic()
            body = {"model": MODEL, "prompt": f"again {i}", "max_tokens": 4}
            response = httpx.post(f"{api_url}/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
            assert time.monotonic() - start < STREAM_TIMEOUT_S + 2
    finally:
        for process in reversed(processes):
            _stop(process)


def test_ctrl_c_with_8_streams_in_flight_ends_each_and_exits_within_seconds(tiny_llama_dir):
    """--shutdown-timeout 0: no drain, every open stream ends with an error event at once."""
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    process = _start(
        "serve", "--model", tiny_llama_dir, "--model-name", MODEL, "--shutdown-timeout", "0", *args
    )
    url = f"http://127.0.0.1:{ports['port']}"
    try:

        def serving() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return bool(httpx.get(f"{url}/v1/models", timeout=2).json()["data"])
            return False

        wait_until(serving, timeout=60, what="the model to be served")
        results, threads = _start_streams(url, 8)
        process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        process.wait(timeout=10)
        exited = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, process.stderr.read()
    assert exited < 6, exited
    for r in results:
        assert r.ended_at is not None and r.ended_at - signalled < 6
        # Each stream ends visibly: finished, or an error event; then [DONE] (or, at worst, a clean close).
        assert r.exception is None, r.exception
        assert r.finish_reason == "length" or r.error is not None
        if r.error is not None:
            assert "shutting down" in r.error["message"]
    assert any(r.error is not None for r in results), "every stream had finished before Ctrl-C"


def test_a_burst_against_longserve_serve_gets_no_503(tiny_llama_dir):
    """One process, one event loop for the three servers: 300 clients at once get answers or quick 429s."""
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    limits = ["--worker-concurrency", "4", "--max-queue-len", "8"]
    process = _start("serve", "--model", tiny_llama_dir, "--model-name", MODEL, *limits, *args)
    url = f"http://127.0.0.1:{ports['port']}"
    try:

        def serving() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return bool(httpx.get(f"{url}/v1/models", timeout=2).json()["data"])
            return False

        wait_until(serving, timeout=60, what="the model to be served")
        answers = burst(url, MODEL, 300)
        check_burst(answers, min_ok=12, max_429_s=10)
        worker = f"http://127.0.0.1:{ports['worker-port']}"
        wait_until(lambda: _queue_length(worker) == 0, what="the worker to be idle")
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        _stop(process)


def test_a_worker_killed_while_its_engine_core_builds_leaves_no_orphan(tiny_llama_dir):
    """An orphaned core would hold its device memory for good (it blocks sending its ready message to nobody)."""
    worker = _start("worker", "--model", tiny_llama_dir, "--model-name", MODEL, "--port", str(unused_port()),
                    "--controller-address", f"http://127.0.0.1:{unused_port()}")  # fmt: skip
    cores: list[psutil.Process] = []
    try:

        def core_started() -> bool:
            cores.extend(
                c for c in psutil.Process(worker.pid).children() if "core_process" in " ".join(c.cmdline())
            )
            return bool(cores)

        wait_until(core_started, timeout=60, what="the engine core to start", poll_s=0.01)
        worker.kill()
        worker.wait()
        wait_until(lambda: not cores[0].is_running() or cores[0].status() == psutil.STATUS_ZOMBIE, timeout=15,
                   what="the orphaned engine core to exit")  # fmt: skip
    finally:
        for core in cores:
            with contextlib.suppress(psutil.NoSuchProcess):
                core.kill()
        _stop(worker)
