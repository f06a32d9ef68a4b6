"""Batch client: an OpenAI batch JSONL file in, answers out, sent concurrently to any OpenAI-compatible server.

    longserve batch requests.jsonl -o answers.jsonl --base-url http://127.0.0.1:8000/v1 -c 16

    summary = await run_batch("requests.jsonl", "answers.jsonl", base_url="http://127.0.0.1:8000/v1")

Each input line ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`` is POSTed to
``base_url`` + the url without its leading ``/v1`` (base URLs end in ``/v1``, as the openai client's do); the
answer becomes one output line (file format and crash safety: batch_io.py). Rerunning with the same output file
skips the custom_ids it already answers, so a killed run (Ctrl-C, SIGKILL, a reboot) finishes where it stopped.

At most ``concurrency`` requests are on the wire (an ``asyncio.Semaphore``); at most twice that many are in
flight as tasks, the rest waiting out a backoff, so a request backing off does not hold a slot and the input is
read only as fast as answers come back. Which failures are retried, and what is written: batch_send.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
from rich.console import Console

from longserve.clients.batch_io import (
    BadLine,
    OutputFileError,
    OutputWriter,
    ResumeState,
    count_lines,
    read_requests,
)
from longserve.clients.batch_report import BatchProgress, BatchSummary, format_summary
from longserve.clients.batch_send import BatchAuthError, Outcome, Sender
from longserve.clients.bench import wait_until_ready
from longserve.clients.retry import RetryPolicy

__all__ = ["BatchAuthError", "BatchSummary", "OutputFileError", "main", "run_batch"]


async def run_batch(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    base_url: str = "http://127.0.0.1:8000/v1",
    api_key: str | None = None,
    concurrency: int = 16,
    max_retries: int = 5,
    timeout: float = 600.0,
    ready_timeout: float = 60.0,
    backoff_base: float = 0.5,
    retry_failed: bool = False,
    progress: bool = False,
    stop: asyncio.Event | None = None,
    console: Console | None = None,
) -> BatchSummary:
    """Answer every request of ``input_path`` not yet answered in ``output_path``, appending to it.

    ``api_key`` is sent as a Bearer token (None: no header). ``timeout`` bounds each attempt, ``ready_timeout``
    the wait for the server's /health before the first request. ``retry_failed`` removes failed answers of
    earlier runs from the output and sends those requests again. Setting ``stop`` stops sending: requests on
    the wire finish and are written, the rest are left for a rerun (``summary.interrupted``); cancelling the
    call cancels the requests on the wire instead. Bad input lines and the progress bar go to ``console``
    (default: stderr). Raises FileNotFoundError, OutputFileError, BatchAuthError, RuntimeError (not ready).
    """
    if concurrency < 1 or timeout <= 0:
        raise ValueError("concurrency must be >= 1 and timeout > 0")
    if not Path(input_path).is_file():  # before the output file is created
        raise FileNotFoundError(f"no input file {input_path}")
    policy = RetryPolicy(max_retries=max_retries, base_s=backoff_base)
    console = console or Console(stderr=True)
    stop = stop or asyncio.Event()
    summary = BatchSummary(str(input_path), str(output_path))
    start = time.perf_counter()
    writer = OutputWriter(output_path)
    state = await writer.open(retry_failed=retry_failed)
    summary.torn_bytes = state.torn_bytes
    try:
        with BatchProgress(console, progress) as bar:
            if progress:
                bar.set_total(max(await count_lines(input_path) - len(state.answered), 0))
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            # The semaphore, not the connection pool, sets the load: one connection per slot.
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
                sender = Sender(session, base_url, writer, policy, concurrency, timeout, stop)
                await _run(input_path, base_url, ready_timeout, sender, state, summary, bar, console, stop)
    finally:
        await writer.close()
        summary.wall_s = time.perf_counter() - start
    return summary


async def _run(
    input_path: str | os.PathLike[str],
    base_url: str,
    ready_timeout: float,
    sender: Sender,
    state: ResumeState,
    summary: BatchSummary,
    bar: BatchProgress,
    console: Console,
    stop: asyncio.Event,
) -> None:
    """Read the input, keep at most 2 x concurrency requests in flight, count their outcomes."""
    max_pending = 2 * sender.concurrency
    pending: set[asyncio.Task[Outcome | None]] = set()
    ready = False

    def collect(done: set[asyncio.Task[Outcome | None]]) -> None:
        error: BaseException | None = None
        for task in done:
            # Look at every task's exception, so none is left unretrieved (asyncio would log it at GC).
            if task.exception() is not None:  # BatchAuthError, or a bug: let the first one out
                error = error or task.exception()
                continue
            outcome = task.result()
            if outcome is None:  # dropped unsent when the run was stopped
                summary.interrupted = True
                continue
            summary.succeeded += outcome.ok
            summary.failed += not outcome.ok
            summary.retries += outcome.retries
            summary.total_tokens += outcome.tokens
            bar.advance(failed=not outcome.ok, tokens=outcome.tokens)
        if error is not None:
            raise error

    try:
        async with contextlib.aclosing(read_requests(input_path)) as items:  # closes the file on a break
            async for item in items:
                if stop.is_set():
                    summary.interrupted = True
                    break
                if isinstance(item, BadLine):
                    summary.bad_lines.append(item)
                    _say(console, f"bad input line {item.line_no}: {item.reason}")
                    bar.advance(failed=False, tokens=0)
                    continue
                if item.custom_id in state.answered:
                    summary.skipped += 1
                    summary.skipped_failed += item.custom_id in state.failed
                    continue
                if not ready:  # only once there is something to send: a finished file needs no server
                    await wait_until_ready(sender.session, base_url, ready_timeout)
                    ready = True
                while len(pending) >= max_pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
                pending.add(asyncio.create_task(sender.answer(item), name=f"batch-{item.custom_id}"))
                sender.writer.check()
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            collect(done)
    finally:  # cancelled, or an error: cancel the rest; whatever they handed the writer is still written
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _say(console: Console, text: str) -> None:
    """A plain message on the console (above the progress bar), never wrapped or styled: it may be parsed."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="OpenAI batch input: one JSON request per line")
    p.add_argument("-o", "--output", required=True, help="batch output file; an existing one is resumed")
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="ending in /v1 (default %(default)s)"
    )
    # No default shown: it would print the key.
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token ($OPENAI_API_KEY)"
    )
    p.add_argument("-c", "--concurrency", type=int, default=16, help="requests on the wire at once (16)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/connection errors (5)")
    p.add_argument("--backoff-base", type=float, default=0.5, help="first backoff window, s; doubles (0.5)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one attempt may take (600)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for /health (60)")
    p.add_argument("--retry-failed", action="store_true", help="send requests whose answer failed again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway if not a TTY)")
    return p


async def _main(args: argparse.Namespace, console: Console) -> int:
    stop = asyncio.Event()
    run = asyncio.create_task(
        run_batch(
            args.input,
            args.output,
            base_url=args.base_url,
            api_key=args.api_key,
            concurrency=args.concurrency,
            max_retries=args.max_retries,
            timeout=args.timeout,
            ready_timeout=args.ready_timeout,
            backoff_base=args.backoff_base,
            retry_failed=args.retry_failed,
            progress=not args.no_progress and console.is_terminal,
            stop=stop,
            console=console,
        )
    )

    def interrupt() -> None:
        if stop.is_set():  # the second Ctrl-C: do not wait for the requests on the wire
            run.cancel()
            return
        stop.set()
        _say(console, "interrupted: letting requests on the wire finish (Ctrl-C again to cancel them)")

    loop = asyncio.get_running_loop()
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C cancels the run instead
            loop.add_signal_handler(sig, interrupt)
            signals.append(sig)
    try:
        summary = await run
    except asyncio.CancelledError:
        _say(console, f"cancelled: rerun the same command to resume; {args.output} holds every answer so far")
        return 130
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    _say(console, format_summary(summary))
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    console = Console(stderr=True)
    try:
        return asyncio.run(_main(args, console))
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handler: nothing was sent
        _say(console, "interrupted before sending; rerun the same command to start")
        return 130
    except (OSError, ValueError, RuntimeError) as exc:  # a missing input, a locked output, no server
        _say(console, f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
