"""The worker's streamed answer: newline-delimited JSON lines, with a blank keep-alive line whenever nothing
else has been sent for ``keepalive_s``.

The keep-alive is what lets a reader tell a frozen worker from a busy one: a request may wait minutes in the
worker's queue or in a long prefill, but a live worker's event loop writes a blank line every few seconds, so
a reader's per-read timeout fires only when the worker itself stops (``kill -STOP``, a hung host). Readers
skip blank lines.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from longserve.serve.keepalive import with_keepalive

KEEPALIVE_LINE = b"\n"


class NdjsonStream(StreamingResponse):
    """``items`` as ndjson lines; closes ``items`` and runs ``on_close`` however the response ends.

    Starlette cancels the body on a client disconnect, which may leave ``items`` suspended mid-await; closing it
    here is what aborts the engine request and gives the worker's queue place back without waiting for garbage
    collection.
    """

    def __init__(
        self,
        items: AsyncGenerator[BaseModel],
        keepalive_s: float,
        on_close: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        self._items = items
        self._keepalive_s = keepalive_s
        self._on_close = on_close
        super().__init__(self._lines(), media_type="application/x-ndjson")

    async def _lines(self) -> AsyncIterator[bytes]:
        # aclosing: leaving early must cancel the pending step now, before __call__ closes ``items``.
        async with aclosing(with_keepalive(self._items, self._keepalive_s)) as items:
            async for item in items:
                yield (
                    KEEPALIVE_LINE
                    if item is None
                    else item.model_dump_json(exclude_none=True).encode() + b"\n"
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
                await self._items.aclose()
            finally:
                if self._on_close is not None:
                    result = self._on_close()
                    if result is not None:
                        await result
