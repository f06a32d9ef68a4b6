"""The engine core: builds the LLMEngine, then the one engine loop — take requests, step, send the step's
token deltas — talking to its client over two ZMQ sockets. Its forward passes never share a GIL or compute threads
with an HTTP event loop (as vLLM v1's EngineCore).

The main thread does everything, so torch's compute threads belong to the thread that steps. The loop blocks
on its inbox only while the engine is idle and leaves when told to. A watchdog thread ends the process the
moment its parent is gone, also while the engine builds or steps.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time

import msgspec

from longserve.config import EngineConfig
from longserve.distributed.launch import RankDiedError
from longserve.engine.protocol import (
    AbortRequest,
    CoreFailed,
    CoreReady,
    EmbedCall,
    EmbedDone,
    EngineRequest,
    LoRACall,
    LoRADone,
    RequestDelta,
    Shutdown,
    StepOutputs,
    encoder,
    to_core_decoder,
)

log = logging.getLogger(__name__)
IDLE_POLL_MS = 500  # an idle core's longest wait on its inbox
PARENT_POLL_S = 0.5  # how often the watchdog checks that the parent still exists
PROGRESS_S = 1.0  # a busy core sends something at least this often (its client's stall watchdog listens)


def main() -> None:
    """``python -m longserve.engine.core_process --inbox ADDR --outbox ADDR --parent-pid PID``, the EngineConfig
    as JSON on stdin (started by ``EngineCoreClient``; a fresh interpreter, so the parent's ``__main__`` is never
    re-imported)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--outbox", required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    parser.add_argument("--parent-pid", type=int, required=True, help="leave once this process is gone")
    args = parser.parse_args()
    # The parent's pid comes from the parent: it may be gone before this line runs (os.getppid() would say 1).
    threading.Thread(
        target=_exit_with_parent, args=(args.parent_pid,), name="parent-watch", daemon=True
    ).start()
    # Ctrl-C in a terminal reaches the whole process group: the client stops this core (a traceback here
    # would be noise on every stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    run_engine_core(config, args.inbox, args.outbox, args.log_level)


def run_engine_core(
    config: EngineConfig,
    inbox_address: str,
    outbox_address: str,
    log_level: int | None = None,
    *,
    context=None,  # zmq.Context: the client's own when the loop runs on its thread (inproc addresses)
    on_built=None,  # in-process: called with the LLMEngine once built (tests and debugging look inside)
) -> None:
    """Build the engine, say so (or why not) to the client, then run the loop until told to stop."""
    import zmq

    in_process = context is not None
    if not in_process:
        logging.basicConfig(level=log_level or logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(inbox_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(outbox_address)
    send = encoder().encode
    try:
        from longserve.engine.engine import LLMEngine

        engine = LLMEngine(config)
    except Exception as exc:  # handed to the client, which raises it from create()
        log.debug("engine core could not start", exc_info=True)
        outbox.send(send(CoreFailed(type(exc).__name__, str(exc))))
        _close(context, inbox, outbox, in_process)
        return
    if on_built is not None:
        on_built(engine)
    outbox.send(send(CoreReady(engine.limits, engine.quantization, engine.tokenizer.spec())))
    if not in_process:
        # The model's many long-lived objects leave the collector's view, so a full collection never pauses
        # a step to scan them (vLLM does the same). After the ready message: it overlaps the client's own
        # start (its tokenizer, the servers' handshake) instead of adding to it.
        gc.collect()
        gc.freeze()
    try:
        EngineCoreLoop(engine, inbox, outbox).run()
    except zmq.ContextTerminated:
        # A thread core shares its client's context: the client terminates it when the thread did not stop
        # within its shutdown timeout, and that is an order to stop as well.
        if not in_process:
            raise
    finally:
        engine.close()  # the other tensor-parallel ranks, when there are any
        _close(context, inbox, outbox, in_process)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process once its parent is gone. The loop cannot be the one to notice: an orphan may be
    building (a minute on a GPU), stepping, or blocked sending its ready message to nobody, and it would hold
    its device memory all along (an H100 run lost 68 GB to two such cores of a server that had died)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    log.warning("engine core: its parent process is gone, exiting")
    os._exit(1)


def _close(context, inbox, outbox, in_process: bool) -> None:
    inbox.close(linger=0)
    outbox.close(linger=2000)  # let the last messages (failures, final outputs) reach the client
    if not in_process:
        context.term()


class EngineCoreLoop:
    """Take every queued command, step once, send that step's deltas; repeat until told to stop.

    It runs on its own process's main thread, or on a thread of its client's (``--engine-in-process``).
    """

    def __init__(self, engine, inbox, outbox) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.decode = to_core_decoder().decode
        self.encode = encoder().encode
        self.last_sent = time.monotonic()

    def run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self.inbox.poll(IDLE_POLL_MS)
            while self.inbox.poll(0):
                message = self.decode(self.inbox.recv())
                if isinstance(message, Shutdown):
                    return
                self.handle(message)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except RankDiedError:
                raise  # no step can run any more: the core exits and its client starts another
            except Exception as exc:  # a bug outside any one request's part of the step: logged, never hidden
                log.exception("engine step failed: failing every request")
                outputs = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            now = time.monotonic()
            if outputs or now - self.last_sent > PROGRESS_S:
                self.outbox.send(self.encode(StepOutputs(outputs, self.engine.stats())))
                self.last_sent = now

    def handle(self, message) -> None:
        engine = self.engine
        if isinstance(message, EngineRequest):
            try:
                engine.add_request(message)
            except ValueError as exc:  # validated already: a duplicate id, a changed limit, an adapter gone
                failed = RequestDelta(
                    message.request_id, [], finished=True, error=str(exc), client_error=True
                )
                self.outbox.send(self.encode(StepOutputs([failed], engine.stats())))
        elif isinstance(message, AbortRequest):
            engine.abort(message.request_id, message.seq_index)
        elif isinstance(message, EmbedCall):
            self.outbox.send(self.encode(self.embed(message)))
        elif isinstance(message, LoRACall):
            try:
                if message.path is None:
                    engine.remove_lora(message.name)
                else:
                    engine.add_lora(message.name, message.path)
            except ValueError as exc:  # a bad adapter or name: the caller's 400; running requests go on
                self.outbox.send(self.encode(LoRADone(message.call_id, str(exc))))
            else:
                self.outbox.send(self.encode(LoRADone(message.call_id)))

    def embed(self, call: EmbedCall) -> EmbedDone:
        try:
            return EmbedDone(call.call_id, self.engine.embed_batch(call.token_lists))
        except Exception as exc:  # ValueError and CacheBusyError map to 400/503 in the worker; others to 500
            if not isinstance(exc, ValueError) and type(exc).__name__ != "CacheBusyError":
                log.exception("embedding failed")
            return EmbedDone(call.call_id, error_type=type(exc).__name__, message=str(exc))


if __name__ == "__main__":
    main()
