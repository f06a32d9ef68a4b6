"""Operating a fleet, with real processes on loopback: SIGTERM drains (running streams finish, new requests go
to the other worker, /health 503 while /live 200, exit 0), a short shutdown timeout ends what is left with an
error event and [DONE], ``serve`` drains the same way, a stalled engine core is killed and replaced, and start
and stop log nothing alarming."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import psutil
import pytest
from servers import unused_port, wait_until
from test_process_failures import MODEL, _queue_length, _start, _start_streams, _stop

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
ALARMING = (" WARNING ", " ERROR ", "Traceback", "CRITICAL")


def _cluster(tiny_llama_dir: str, worker_args: list[str]):
    """A controller, two workers and an API server as processes: (processes, api url, worker urls)."""
    ports = [unused_port() for _ in range(4)]
    controller, api = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    beat = ["--heart-beat-interval", "0.5"]
    processes = [_start("controller", "--port", str(ports[0]), *beat)]
    for port in ports[2:]:
        processes.append(_start("worker", "--model", tiny_llama_dir, "--model-name", MODEL, "--port", str(port),
                                "--controller-address", controller, *beat, *worker_args))  # fmt: skip
    processes.append(_start("api", "--port", str(ports[1]), "--controller-address", controller, *beat))

    def registered() -> int:
        with contextlib.suppress(httpx.HTTPError):
            return len(httpx.post(f"{controller}/list_workers", timeout=2).json()["workers"])
        return 0

    wait_until(lambda: registered() == 2, timeout=60, what="both workers to register")
    wait_until(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, timeout=30)
    return processes, api, [f"http://127.0.0.1:{port}" for port in ports[2:]]


def _completion(api: str) -> int:
    body = {"model": MODEL, "prompt": "again", "max_tokens": 4}
    return httpx.post(f"{api}/v1/completions", json=body, timeout=30).status_code


def test_sigterm_drains_a_worker_its_streams_finish_and_new_requests_go_elsewhere(tiny_llama_dir):
    processes, api, workers = _cluster(tiny_llama_dir, ["--shutdown-timeout", "60"])
    try:
        results, threads = _start_streams(api, 8)
        index = max(range(2), key=lambda i: _queue_length(workers[i]))
        draining = processes[1 + index]
        assert _queue_length(workers[index]) > 0
        draining.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{workers[index]}/health", timeout=2).status_code == 503, timeout=5)
        assert httpx.get(f"{workers[index]}/live", timeout=2).status_code == 200
        assert httpx.get(f"{workers[index]}/health", timeout=2).json()["status"] == "draining"
        assert [_completion(api) for _ in range(6)] == [200] * 6  # served by the other worker
        for thread in threads:
            thread.join(90)
        assert [(r.finish_reason, r.error, r.done) for r in results] == [("length", None, True)] * 8
        assert draining.wait(30) == 0
        log = draining.stderr.read()
        assert not any(word in log for word in ALARMING), log
    finally:
        for process in reversed(processes):
            _stop(process)


def test_serve_under_sigterm_drains_its_streams_to_the_end(tiny_llama_dir):
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    process = _start("serve", "--model", tiny_llama_dir, "--model-name", MODEL, *args)
    url = f"http://127.0.0.1:{ports['port']}"
    try:
        wait_until(lambda: _serving(url), timeout=60, what="the model to be served")
        results, threads = _start_streams(url, 8)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: _health(url) == 503, timeout=5, what="/health to say draining")
        for thread in threads:
            thread.join(60)
        assert process.wait(timeout=30) == 0
    finally:
        _stop(process)
    assert [(r.finish_reason, r.error, r.done) for r in results] == [("length", None, True)] * 8
    log = process.stderr.read()
    assert not any(word in log for word in ALARMING), log


def _health(url: str) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code
    return 0


def test_a_short_shutdown_timeout_ends_what_is_left_with_an_error_event(tiny_llama_dir):
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    process = _start(
        "serve", "--model", tiny_llama_dir, "--model-name", MODEL, "--shutdown-timeout", "0.5", *args
    )
    url = f"http://127.0.0.1:{ports['port']}"
    try:
        wait_until(lambda: _serving(url), timeout=60, what="the model to be served")
        results, threads = _start_streams(url, 8)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert process.wait(timeout=20) == 0
        for thread in threads:
            thread.join(5)
    finally:
        _stop(process)
    assert time.monotonic() - signalled < 10
    for r in results:
        assert r.exception is None and r.done, (r.exception, r.done)  # an error event and [DONE], never a cut
        assert r.finish_reason == "length" or "shutting down" in r.error["message"]
    assert any(r.error is not None for r in results), "every stream finished within half a second"


def test_a_stalled_engine_core_is_replaced_and_its_requests_fail(tiny_llama_dir):
    processes, api, workers = _cluster(tiny_llama_dir, ["--engine-stall-timeout", "2"])
    try:
        results, threads = _start_streams(api, 4)
        index = max(range(2), key=lambda i: _queue_length(workers[i]))
        core = next(
            c
            for c in psutil.Process(processes[1 + index].pid).children()
            if "core_process" in " ".join(c.cmdline())
        )
        os.kill(core.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        for thread in threads:
            thread.join(30)
        stalled = [r for r in results if r.error is not None]
        assert stalled and all("stalled" in r.error["message"] for r in stalled), [r.error for r in results]
        assert all(r.ended_at - stopped < 2 + 5 for r in stalled)
        status = httpx.post(f"{workers[index]}/worker_get_status", timeout=5).json()
        assert status["engine_stalls"] == 1 and status["engine_restarts"] == 1
        wait_until(lambda: httpx.get(f"{workers[index]}/health", timeout=2).status_code == 200, timeout=60)
        assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE
        assert [_completion(api) for _ in range(4)] == [200] * 4
        metrics = httpx.get(f"{api}/metrics", timeout=5).text
        assert "longserve:engine_stalls_total{" in metrics
    finally:
        for process in reversed(processes):
            _stop(process)


def test_serve_starts_and_stops_without_a_warning(tiny_llama_dir):
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    process = _start("serve", "--model", tiny_llama_dir, "--model-name", MODEL, *args)
    url = f"http://127.0.0.1:{ports['port']}"
    try:
        wait_until(lambda: _serving(url), timeout=60, what="the model to be served")
        assert _completion(url) == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        _stop(process)
    log = process.stderr.read()
    assert not any(word in log for word in ALARMING), log


def _serving(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return bool(httpx.get(f"{url}/v1/models", timeout=2).json()["data"])
    return False
