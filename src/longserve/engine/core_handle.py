"""Where one engine core runs: a child process running ``core_process`` (the default), or a thread of this
process (``in_process``: tests, debugging). ``EngineCoreClient`` starts, watches, kills and joins it through
this handle, whichever it is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import msgspec

from longserve.config import EngineConfig

log = logging.getLogger(__name__)


class CoreHandle:
    """One started core, its sockets' addresses given (``inbox``: what it reads; ``outbox``: where it writes)."""

    def __init__(
        self,
        config: EngineConfig,
        inbox: str,
        outbox: str,
        *,
        in_process: bool,
        context=None,  # zmq.Context the client shares with a thread core (inproc addresses live in one)
        on_built: Callable | None = None,  # a thread core: called with its LLMEngine once built
    ) -> None:
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        if in_process:
            from longserve.engine.core_process import run_engine_core

            self.thread = threading.Thread(
                target=run_engine_core,
                args=(config, inbox, outbox),
                kwargs={"context": context, "on_built": on_built},
                name="longserve-engine",
                daemon=True,
            )
            self.thread.start()
            return
        level = logging.getLogger("longserve").getEffectiveLevel()
        command = [
            sys.executable,
            "-m",
            "longserve.engine.core_process",
            "--inbox",
            inbox,
            "--outbox",
            outbox,
            "--parent-pid",
            str(os.getpid()),
        ]
        self.process = subprocess.Popen([*command, "--log-level", str(level)], stdin=subprocess.PIPE)
        self.process.stdin.write(msgspec.json.encode(config))
        self.process.stdin.close()

    @property
    def killable(self) -> bool:
        """A process can be killed (a stalled one is replaced); a thread cannot."""
        return self.process is not None

    def exit_code(self) -> int | None:
        """None while the core runs; its exit code once it is gone (1 for a thread that ended)."""
        if self.thread is not None:
            return None if self.thread.is_alive() else 1
        return self.process.poll()

    def kill(self) -> None:
        """Kill a core process now and reap it (a no-op for a thread)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def join(self, timeout: float) -> None:
        """Wait for the core to exit after it was told to stop; a process still there after ``timeout`` is
        killed."""
        if self.thread is not None:
            self.thread.join(timeout)
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine core did not stop in %.0f s: killing it", timeout)
            self.process.kill()
            self.process.wait(5)
