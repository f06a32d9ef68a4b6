"""Test helper: serve an ASGI app with a real uvicorn server on a free loopback port, in a background thread.

    from servers import serve_app

    with serve_app(app) as base_url:  # e.g. "http://127.0.0.1:54321"; the app's lifespan has started
        httpx.post(f"{base_url}/list_models")
    # here the server has shut down (lifespan exit ran) and its thread is joined

Several servers may run at once (controller, worker, api server), each on its own thread and event loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

STARTUP_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 10.0


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (connections to it are refused until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(
    app: object,
    host: str = "127.0.0.1",
    port: int = 0,  # 0: any free port
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
) -> Iterator[str]:
    """Run ``app`` until the block exits; yields its base URL once it accepts connections."""
    # Bind the socket here and hand it to uvicorn, so no other process can take the port in between.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,  # leave the test process's logging (and pytest's caplog) alone
        lifespan="on",
        # An open stream must not hang teardown forever; in-flight requests get this long to finish.
        timeout_graceful_shutdown=max(1, int(shutdown_timeout_s / 2)),
    )
    server = uvicorn.Server(config)
    # server.run() makes its own event loop in the thread; uvicorn installs no signal handlers off the main
    # thread, so Ctrl-C still reaches pytest.
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (lifespan startup failed?)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {startup_timeout_s} s")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_timeout_s)
        if thread.is_alive():
            server.force_exit = True  # skip waiting for connections and tasks
            thread.join(timeout=shutdown_timeout_s)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn on port {port} did not shut down within {2 * shutdown_timeout_s} s")


def wait_until(predicate, timeout: float = 15.0, what: str = "condition", poll_s: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)
