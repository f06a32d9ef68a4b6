"""Keep-alive for streamed answers: ``with_keepalive`` yields ``None`` whenever ``items`` has been silent for
``interval_s``, so a stream writer can send a keep-alive (a blank NDJSON line, an SSE comment) and a reader
that times out silent peers can tell a busy server from a frozen one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def with_keepalive(items: AsyncIterator[T], interval_s: float) -> AsyncIterator[T | None]:
    """``items``, with ``None`` in between whenever the next item takes longer than ``interval_s``.

    Waiting never cancels ``items`` mid-step; leaving early cancels the pending step, which ends ``items`` at
    its await (its ``finally`` blocks run).
    """
    pending: asyncio.Task | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(items))
            while not (await asyncio.wait({pending}, timeout=interval_s))[0]:
                yield None
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
