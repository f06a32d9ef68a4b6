"""API server processes: ``api_server_count`` copies of the API app on one port, each in its own process with
its own event loop and its own stream to every worker.

Each process binds its own socket with ``SO_REUSEPORT``, so the kernel spreads new connections over them and
a process that dies takes only its own connections with it; the others keep serving. The parent starts them
(``spawn``: no torch or engine state is inherited), waits until each listens, asks them to stop (SIGTERM: each
ends its open streams with an error event, as one API server does on Ctrl-C) and reaps them. A child whose
parent is gone stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from longserve.config import ServeConfig

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0  # after SIGTERM; then SIGKILL
PARENT_POLL_S = 1.0


class ApiServerProcesses:
    """``count`` API server processes on ``config.host:config.api_port``."""

    def __init__(self, config: ServeConfig, count: int) -> None:
        if count < 1:
            raise ValueError(f"api_server_count must be >= 1, got {count}")
        self.config = config
        self.count = count
        self.processes: list[BaseProcess] = []
        self._pipes: list[Connection] = []  # to each process: "go" there, "ready" back

    def spawn(self) -> None:
        """Start the processes: they import everything, then wait for ``start()`` to let them listen (so
        `serve` overlaps their start-up with the engine's, yet they answer only once the controller is up)."""
        context = multiprocessing.get_context("spawn")
        for index in range(self.count):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_child_main,
                args=(self.config, child_end, os.getpid()),
                name=f"longserve-api-{index}",
                daemon=False,  # its own event loop and shutdown; reaped in stop()
            )
            process.start()
            child_end.close()
            self.processes.append(process)
            self._pipes.append(parent_end)

    async def start(self) -> None:
        """Let every process listen (spawning them first if ``spawn()`` was not called); return once each
        does. RuntimeError if one fails to start."""
        if not self.processes:
            self.spawn()
        for pipe in self._pipes:
            pipe.send("go")
        deadline = time.monotonic() + START_TIMEOUT_S
        for index, pipe in enumerate(self._pipes):
            message = await asyncio.to_thread(_receive, pipe, deadline - time.monotonic())
            if message != "ready":
                await self.stop()
                raise RuntimeError(f"API server process {index} did not start: {message}")

    def failure(self) -> str | None:
        """Why serving is over: every process has exited (one that dies leaves the others serving)."""
        if self.processes and all(p.exitcode is not None for p in self.processes):
            codes = ", ".join(str(p.exitcode) for p in self.processes)
            return f"every API server process exited (exit codes {codes})"
        return None

    def begin_shutdown(self) -> None:
        """Ask each live process to stop: it ends its open streams with an error event, then exits."""
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    async def stop(self) -> None:
        self.begin_shutdown()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("API server process %s did not stop in time: killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5.0)


def _receive(receiver: Connection, timeout_s: float) -> str:
    if not receiver.poll(max(0.0, timeout_s)):
        return f"no answer within {START_TIMEOUT_S:.0f} s"
    try:
        return receiver.recv()
    except EOFError:
        return "it exited during start-up (see its log above)"


def _child_main(config: ServeConfig, pipe: Connection, parent_pid: int) -> None:
    """One API server process (the target of ``spawn``): import, wait for "go", serve."""
    from longserve.serve import api_server, launcher  # noqa: F401 - the slow part, done while waiting

    # Ctrl-C in a terminal reaches the whole process group: until it serves, the parent decides (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not pipe.poll(PARENT_POLL_S):
        if os.getppid() != parent_pid:
            return  # the parent is gone before we served anything
    if pipe.recv() != "go":
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def main() -> None:
        watch = asyncio.create_task(_exit_with_parent(parent_pid))
        try:
            await launcher.serve_api_process(config, lambda: pipe.send("ready"))
        finally:
            watch.cancel()

    code = launcher.run(main())
    with contextlib.suppress(OSError):
        pipe.send(f"exit code {code}")  # read only if it never got to "ready"
    raise SystemExit(code)


async def _exit_with_parent(parent_pid: int) -> None:
    """Stop this process (as SIGTERM does) once its parent is gone: an orphan would hold the port."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
