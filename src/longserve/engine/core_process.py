"""The engine core process: builds the LLMEngine, then one busy loop — take requests, step, send the step's
outputs — talking to its client over two ZMQ sockets. Its forward passes never share a GIL or compute threads
with an HTTP event loop (as vLLM v1's EngineCore).

The main thread does everything, so torch's compute threads belong to the thread that steps. The loop blocks
on its inbox only while the engine is idle, and leaves when told to, when its parent process is gone, or
when the inbox closes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import msgspec

from longserve.config import EngineConfig
from longserve.engine.core_messages import (
    AbortRequest,
    AddRequest,
    CompletionDelta,
    CoreFailed,
    CoreReady,
    EmbedCall,
    EmbedDone,
    EngineStats,
    OutputDelta,
    Shutdown,
    StepOutputs,
    encoder,
    to_core_decoder,
)
from longserve.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
IDLE_POLL_MS = 500  # how often an idle core checks that its parent still exists


def main() -> None:
    """``python -m longserve.engine.core_process --inbox ADDR --outbox ADDR``, the EngineConfig as JSON on stdin
    (started by ``EngineCoreClient``; a fresh interpreter, so the parent's ``__main__`` is never re-imported)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--outbox", required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    args = parser.parse_args()
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    run_engine_core(config, args.inbox, args.outbox, args.log_level)


def run_engine_core(config: EngineConfig, inbox_address: str, outbox_address: str, log_level: int) -> None:
    """Build the engine, say so (or why not) to the client, then run the loop until told to stop."""
    import zmq

    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
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
        _close(context, inbox, outbox)
        return
    outbox.send(send(CoreReady(engine.limits, engine.quantization)))
    try:
        EngineCoreLoop(engine, inbox, outbox, parent).run()
    finally:
        engine.close()  # the other tensor-parallel ranks, when there are any
        _close(context, inbox, outbox)


def _close(context, inbox, outbox) -> None:
    inbox.close(linger=0)
    outbox.close(linger=2000)  # let the last messages (failures, final outputs) reach the client
    context.term()


class EngineCoreLoop:
    """Take every queued command, step once, send that step's outputs; repeat until told to stop."""

    def __init__(self, engine, inbox, outbox, parent_pid: int) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.decode = to_core_decoder().decode
        self.encode = encoder().encode
        self.prompt_logprobs_sent: set[str] = set()

    def run(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            if not self.inbox.poll(0 if busy else IDLE_POLL_MS):
                if not busy and os.getppid() != self.parent_pid:
                    log.warning("engine core: the worker process is gone, exiting")
                    return
            while self.inbox.poll(0):
                message = self.decode(self.inbox.recv())
                if isinstance(message, Shutdown):
                    return
                self.handle(message)
            if not self.engine.has_unfinished():
                continue
            outputs = self.engine.step()
            if outputs:
                self.outbox.send(self.encode(StepOutputs([self.delta(o) for o in outputs], self.stats())))

    def handle(self, message) -> None:
        engine = self.engine
        if isinstance(message, AddRequest):
            try:
                request = engine.build_request(
                    message.request_id,
                    message.prompt if message.prompt is not None else message.prompt_token_ids,
                    message.params,
                    prompt_token_ids=message.prompt_token_ids,
                )
                engine.add_request(request)
            except ValueError as exc:  # the client validated it already: a duplicate id or a changed limit
                failed = OutputDelta(message.request_id, [], finished=True, error=str(exc))
                self.outbox.send(self.encode(StepOutputs([failed], self.stats())))
        elif isinstance(message, AbortRequest):
            engine.abort(message.request_id)
        elif isinstance(message, EmbedCall):
            self.outbox.send(self.encode(self.embed(message)))

    def embed(self, call: EmbedCall) -> EmbedDone:
        try:
            return EmbedDone(call.call_id, self.engine.embed_batch(call.token_lists))
        except Exception as exc:  # ValueError and CacheBusyError map to 400/503 in the worker; others to 500
            if not isinstance(exc, ValueError) and type(exc).__name__ != "CacheBusyError":
                log.exception("embedding failed")
            return EmbedDone(call.call_id, error_type=type(exc).__name__, message=str(exc))

    def delta(self, output: RequestOutput) -> OutputDelta:
        prompt_logprobs = None
        if output.prompt_logprobs is not None and output.request_id not in self.prompt_logprobs_sent:
            prompt_logprobs = output.prompt_logprobs
            self.prompt_logprobs_sent.add(output.request_id)
        if output.finished:
            self.prompt_logprobs_sent.discard(output.request_id)
        completions = [
            CompletionDelta(
                c.index, c.delta_text, c.delta_token_ids, c.delta_logprobs, c.finish_reason, c.stop_reason
            )
            for c in output.outputs
        ]
        return OutputDelta(
            output.request_id,
            completions,
            output.finished,
            output.error,
            prompt_logprobs,
            output.num_cached_tokens,
        )

    def stats(self) -> EngineStats:
        return self.engine.stats()


if __name__ == "__main__":
    main()
