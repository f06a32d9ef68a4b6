"""API server processes: ``api_server_count`` copies of the API app on one port, each in its own process with
its own event loop and its own stream to every worker.

Each process binds its own socket with ``SO_REUSEPORT``, so the kernel spreads new connections over them and
a process that dies takes only its own connections with it; the others keep serving. The parent starts them
(fresh interpreters: no torch or engine state is inherited), waits until each listens, asks them to stop (SIGTERM: the
first drains, a second ends the open streams with an error event at once, as one API server does on Ctrl-C) and
reaps them. A child whose
parent is gone stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time

import msgspec

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
        self.processes: list[subprocess.Popen] = []
        self._ready: list[int] = []  # read end of each process's pipe: "ready" comes back on it

    def spawn(self) -> None:
        """Start the processes: they import everything, then wait for ``start()`` to let them listen (so
        `serve` overlaps their start-up with the engine's, yet they answer only once the controller is up)."""
        config = msgspec.json.encode(self.config)
        for _ in range(self.count):
            read_end, write_end = os.pipe()
            command = [sys.executable, "-m", "longserve.serve.api_processes", "--ready-fd", str(write_end)]
            command += ["--parent", str(os.getpid())]
            process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(write_end,))
            os.close(write_end)
            with contextlib.suppress(BrokenPipeError):  # it died at once: start() reports it
                process.stdin.write(config + b"\n")
                process.stdin.flush()
            self.processes.append(process)
            self._ready.append(read_end)

    async def start(self) -> None:
        """Let every process listen (spawning them first if ``spawn()`` was not called); return once each
        does. RuntimeError if one fails to start."""
        if not self.processes:
            self.spawn()
        for process in self.processes:
            with contextlib.suppress(BrokenPipeError):  # it died: its ready pipe says so
                process.stdin.write(b"go\n")
                process.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        ready, self._ready = self._ready, []
        for index, read_end in enumerate(ready):
            message = await asyncio.to_thread(_read_message, read_end, deadline - time.monotonic())
            if message != "ready":
                for rest in ready[index:]:
                    os.close(rest)
                await self.stop()
                raise RuntimeError(f"API server process {index} did not start: {message}")
            os.close(read_end)

    def failure(self) -> str | None:
        """Why serving is over: every process has exited (one that dies leaves the others serving)."""
        if self.processes and all(p.poll() is not None for p in self.processes):
            codes = ", ".join(str(p.returncode) for p in self.processes)
            return f"every API server process exited (exit codes {codes})"
        return None

    def begin_shutdown(self) -> None:
        """Ask each live process to stop (SIGTERM): the first time it drains (refuses new requests, finishes its
        streams for up to the shutdown timeout), a second time it ends its open streams with an error event at
        once; then it exits."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        self.begin_shutdown()
        deadline = time.monotonic() + self.config.shutdown_timeout_s + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                await asyncio.to_thread(process.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("API server process %s did not stop in time: killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        for read_end in self._ready:
            os.close(read_end)
        self._ready = []


def _read_message(read_end: int, timeout_s: float) -> str:
    readable, _, _ = select.select([read_end], [], [], max(0.0, timeout_s))
    if not readable:
        return f"no answer within {START_TIMEOUT_S:.0f} s"
    return os.read(read_end, 64).decode().strip() or "it exited during start-up (see its log above)"


def main() -> None:
    """One API server process: its config on stdin, then "go" there once it may listen; "ready" goes back on
    ``--ready-fd`` when it does."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    # Ctrl-C in a terminal reaches the whole process group: the parent decides, and asks with SIGTERM (the
    # first drains, a second stops at once).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = msgspec.json.decode(sys.stdin.buffer.readline(), type=ServeConfig)
    from longserve.serve import api_server, launcher  # noqa: F401 - the slow part, done while waiting

    if sys.stdin.buffer.readline().strip() != b"go":  # EOF: the parent is gone before we served anything
        return

    def started() -> None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    async def serve() -> None:
        watch = asyncio.create_task(_exit_with_parent(args.parent))
        try:
            await launcher.serve_api_process(config, started, signals=(signal.SIGTERM,))
        finally:
            watch.cancel()

    raise SystemExit(launcher.run(serve()))


async def _exit_with_parent(parent_pid: int) -> None:
    """Stop this process (as SIGTERM does) once its parent is gone: an orphan would hold the port."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
