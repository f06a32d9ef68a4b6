"""Several longserve workers behind one controller and one API server, as one process for the benchmarks.

Starts `longserve controller`, N `longserve worker`s (each with its own engine core and `--threads` torch
threads) and `longserve api` on free loopback ports, prints `longserve: serving model ...` once the controller
lists every worker (the line `_serve_systems` waits for), and on SIGINT/SIGTERM stops them all.

Usage:  python benchmarks/_multi_worker.py --port 8000 [--workers 2] [--threads 1]
            [--dispatch-method shortest_queue|lottery|cache_aware]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the API server's port")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker's engine core")
    parser.add_argument("--dispatch-method", default="shortest_queue")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "longserve.cli"]
    controller = f"http://127.0.0.1:{free_port()}"
    commands = [
        cli + ["controller", "--port", controller.rsplit(":", 1)[1]]
        + ["--dispatch-method", args.dispatch_method]
    ]  # fmt: skip
    for _ in range(args.workers):
        commands.append(
            cli + ["worker", "--port", str(free_port()), "--controller-address", controller]
            + ["--threads", str(args.threads)]
        )  # fmt: skip
    commands.append(cli + ["api", "--port", str(args.port), "--controller-address", controller])
    children = [subprocess.Popen(cmd) for cmd in commands]
    stopping = threading.Event()

    def stop(*_):
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + READY_TIMEOUT_S
    announced = False
    try:
        while not stopping.wait(0.5):
            if any(child.poll() is not None for child in children):
                print("a longserve process exited; stopping the rest", file=sys.stderr, flush=True)
                return 1
            if announced:
                continue
            if time.monotonic() > deadline:
                print("workers not registered in time", file=sys.stderr, flush=True)
                return 1
            try:
                workers = httpx.post(f"{controller}/list_workers", timeout=5).json()
            except (httpx.HTTPError, ValueError, KeyError):
                continue
            if len(workers["workers"]) >= args.workers:
                print(
                    f"longserve: serving model with {args.workers} workers ({args.dispatch_method})",
                    flush=True,
                )
                announced = True
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
