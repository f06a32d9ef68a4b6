"""One client request's worker streams: one per prompt, opened concurrently (with failover), merged into one
sequence of ``(prompt index, WorkerStreamChunk)``, and closed together.

The request's lifetime is watched too: when the client disconnects, the merged sequence ends and every worker
stream is closed, which makes the workers abort the requests and free their KV cache. The same happens, with
an error the client sees, when the request runs past ``request_timeout_s`` or the API server is stopping.

``start()`` waits for each stream's first line (the prompt line, sent once the worker has accepted the request)
so that a rejection still becomes an HTTP error status; after that, an error can only travel inside the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from fastapi import Request
from pydantic import ValidationError

from longserve.serve.errors import APIError, ClientDisconnected, service_unavailable
from longserve.serve.metrics import RequestRecorder
from longserve.serve.prefix_routing import prompt_fingerprint
from longserve.serve.upstream import Upstream, ndjson_lines
from longserve.serve.worker_protocol import ErrorInfo, WorkerGenerateRequest, WorkerStreamChunk

log = logging.getLogger(__name__)

STREAM_PATH = "/worker_generate_stream"


class StreamBroken(Exception):
    """A worker stream failed after it started (worker died, or sent an error line)."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclass
class _Item:
    prompt: int  # -1 for the watchers: the client disconnected, or (with ``error``) timeout or shutdown
    chunk: WorkerStreamChunk | None = None
    error: APIError | None = None  # the stream failed; before its first line this is the request's answer
    ended: bool = False  # the stream closed (after a finished line, or too early)


class Generation:
    """Merged worker streams of one request. Use as ``async with`` (or call ``aclose()``) after ``start()``."""

    def __init__(
        self,
        upstream: Upstream,
        request: Request,
        model: str,
        payloads: list[WorkerGenerateRequest],
        recorder: RequestRecorder,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.model = model
        self.payloads = payloads
        self.recorder = recorder
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[_Item] = []  # read by start() past some stream's first line; replayed by events()
        self._finished: set[int] = set()
        self._closed = False

    async def start(self) -> None:
        """Open every stream; return once each has sent its prompt line. Raises the first rejection as
        ``APIError`` (or ``ClientDisconnected``) and closes everything then."""
        self.recorder.metrics.in_flight.inc()
        self._tasks = [
            asyncio.create_task(self._read(i, payload), name=f"worker-stream-{i}")
            for i, payload in enumerate(self.payloads)
        ]
        self._tasks.append(asyncio.create_task(self._watch_disconnect(), name="disconnect-watch"))
        self._tasks.append(asyncio.create_task(self._watch_stop(), name="stop-watch"))
        if self.upstream.request_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watch_deadline(), name="deadline-watch"))
        started: set[int] = set()  # prompts whose stream sent its first line
        try:
            while len(started) < len(self.payloads):
                item = await self._queue.get()
                if item.prompt < 0 and item.error is None:
                    raise ClientDisconnected()
                if item.error is not None:
                    raise item.error
                if item.chunk is None or item.chunk.error is not None:
                    info = item.chunk.error if item.chunk is not None else None
                    if info is not None:
                        raise APIError.from_info(info)
                    raise service_unavailable(
                        "the worker closed the stream before answering", code="worker_failed"
                    )
                started.add(item.prompt)
                self._pending.append(item)
        except BaseException:
            await self.aclose()
            raise

    async def events(self) -> AsyncIterator[tuple[int, WorkerStreamChunk]]:
        """Every chunk (first lines included) until all streams finished.

        Raises ``StreamBroken`` when a stream fails and ``ClientDisconnected`` when the client is gone.
        """
        while len(self._finished) < len(self.payloads):
            item = self._pending.pop(0) if self._pending else await self._queue.get()
            if item.prompt < 0 and item.error is None:
                raise ClientDisconnected()
            if item.error is not None or (item.chunk is not None and item.chunk.error is not None):
                if item.prompt >= 0:
                    self.recorder.on_stream_error(item.prompt)
                raise StreamBroken(item.error.info() if item.error is not None else item.chunk.error)
            if item.chunk is None:  # closed without a finished line: the worker died mid-stream
                if item.prompt in self._finished:
                    continue
                self.recorder.on_stream_error(item.prompt)
                raise StreamBroken(_worker_failed("the worker closed the stream before it finished"))
            self.recorder.on_chunk(item.prompt, item.chunk)
            if item.chunk.finished:
                self._finished.add(item.prompt)
            yield item.prompt, item.chunk

    async def aclose(self) -> None:
        """Cancel the readers (closing their worker streams) and the watcher; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self.recorder.metrics.in_flight.dec()
        if self._tasks:
            # Wait until the worker connections are shut. Shielded, so that if our caller is cancelled meanwhile
            # the readers still finish closing; the caller's cancellation propagates all the same.
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _read(self, prompt: int, payload: WorkerGenerateRequest) -> None:
        put = self._queue.put_nowait
        try:
            fingerprint = prompt_fingerprint(payload.prompt)  # a few µs; steers cache_aware dispatch
            async with self.upstream.open_stream(self.model, STREAM_PATH, payload, fingerprint) as response:
                async for line in ndjson_lines(response.content):
                    chunk = WorkerStreamChunk.model_validate_json(line)
                    put(_Item(prompt, chunk=chunk))
                    if chunk.finished or chunk.error is not None:
                        return  # leaving the block closes the response; nothing useful can follow
            put(_Item(prompt, ended=True))
        except APIError as exc:
            put(_Item(prompt, error=exc))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("worker stream for %s broke: %r", payload.request_id, exc)
            why = "went silent past the read timeout" if isinstance(exc, TimeoutError) else f"broke: {exc!r}"
            put(_Item(prompt, error=APIError.from_info(_worker_failed(f"the worker stream {why}"))))
        except ValidationError as exc:
            put(_Item(prompt, error=APIError(f"the worker sent a malformed stream line: {exc}", status=500)))
        except Exception as exc:  # a bug on this path: logged with its traceback, and the client is told
            log.exception("worker stream reader for %s failed", payload.request_id)
            put(_Item(prompt, error=APIError(f"internal error: {type(exc).__name__}", status=500)))

    async def _watch_stop(self) -> None:
        await self.upstream.stopping.wait()
        error = service_unavailable("the server is shutting down", code="server_shutting_down")
        self._queue.put_nowait(_Item(-1, error=error))

    async def _watch_deadline(self) -> None:
        timeout = self.upstream.request_timeout_s
        await asyncio.sleep(timeout)
        message = f"the request did not finish within the server's request timeout ({timeout:g} s)"
        self._queue.put_nowait(_Item(-1, error=APIError(message, status=504, code="request_timeout")))

    async def _watch_disconnect(self) -> None:
        # The body has been read, so the next ASGI message is the disconnect (or the response completing).
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self._queue.put_nowait(_Item(-1))
                return


def _worker_failed(message: str) -> ErrorInfo:
    return ErrorInfo(message=message, type="server_error", code="worker_failed", status=503)
