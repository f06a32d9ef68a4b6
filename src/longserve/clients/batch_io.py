"""The batch client's files: OpenAI batch input lines in, batch output lines out, and what a rerun may skip.

Input: one request per line, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
Output: one answer per line, in the order answers arrive (OpenAI's batch output is unordered too)::

    {"id": "batch_req_…", "custom_id": "a", "response": {"status_code": 200, "request_id": "…", "body": {…}},
     "error": null}
    {"id": "batch_req_…", "custom_id": "b", "response": null, "error": {"code": "http_503", "message": "…"}}

Crash safety: each output line is written with one ``write`` of the whole line and a flush, by one writer task,
so lines never interleave, and a line is either in the kernel (it survives SIGKILL) or missing. The only damage a
kill can do is a last line without its newline; :func:`open_output` cuts such a torn tail off before appending,
and its request is sent again. Files are read in large chunks, never whole, and never a thread hop per line.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles

try:  # POSIX: keep two runs from appending to one output file at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_CHUNK_BYTES = 1 << 20


class OutputFileError(RuntimeError):
    """The output file cannot be resumed safely (not batch output, or another run is writing it)."""


@dataclass(frozen=True)
class BatchRequest:
    """One valid input line."""

    line_no: int  # 1-based line number in the input file
    custom_id: str
    url: str  # one of SUPPORTED_URLS
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    """One input line that is skipped, and why."""

    line_no: int
    reason: str


@dataclass
class ResumeState:
    """What an existing output file already holds."""

    answered: set[str] = field(default_factory=set)  # custom_ids with an output line; a rerun skips them
    failed: set[str] = field(default_factory=set)  # the subset whose answer was an error or a non-2xx status
    torn_bytes: int = 0  # bytes of a torn last line that were cut off
    dropped_failed: int = 0  # failed answers removed so that their requests go out again (retry_failed)


async def iter_lines(path: str | Path) -> AsyncIterator[tuple[int, bytes, bool]]:
    """``(offset, line, complete)`` for each line of a file, newline stripped; ``complete`` is False only for
    a last line that has no newline."""
    async with aiofiles.open(path, "rb") as f:
        offset, rest = 0, b""
        while chunk := await f.read(_CHUNK_BYTES):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield offset, line, True
                offset += len(line) + 1
        if rest:
            yield offset, rest, False


async def count_lines(path: str | Path) -> int:
    """Non-blank lines of a file (for the progress bar's total), read in chunks."""
    return sum([1 async for _, line, _ in iter_lines(path) if line.strip()])


def parse_request_line(line_no: int, raw: bytes) -> BatchRequest | BadLine | None:
    """One input line as a request, a bad line, or None for a blank line (skipped silently)."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return BadLine(line_no, "not UTF-8 text")
    if not text:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return BadLine(line_no, "not a JSON object")
    custom_id = obj.get("custom_id")
    if custom_id is None:
        return BadLine(line_no, "missing custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(line_no, "custom_id must be a non-empty string")
    if obj.get("method") != "POST":
        return BadLine(line_no, f'custom_id {custom_id!r}: method must be "POST", not {obj.get("method")!r}')
    url = obj.get("url")
    if url not in SUPPORTED_URLS:
        return BadLine(
            line_no, f"custom_id {custom_id!r}: unsupported url {url!r} (use {', '.join(SUPPORTED_URLS)})"
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return BadLine(line_no, f"custom_id {custom_id!r}: body must be a JSON object")
    if body.get("stream"):  # one JSON answer per line: a stream has nowhere to go
        return BadLine(line_no, f"custom_id {custom_id!r}: body.stream is not supported in a batch")
    return BatchRequest(line_no, custom_id, url, body)


async def read_requests(path: str | Path) -> AsyncIterator[BatchRequest | BadLine]:
    """The input file's requests and bad lines in file order; a repeated custom_id is a bad line (the first
    occurrence is the one sent)."""
    first_seen: dict[str, int] = {}
    line_no = 0
    async for _, raw, _ in iter_lines(path):
        line_no += 1
        item = parse_request_line(line_no, raw)
        if isinstance(item, BatchRequest):
            if item.custom_id in first_seen:
                first = first_seen[item.custom_id]
                item = BadLine(line_no, f"duplicate custom_id {item.custom_id!r} (first on line {first})")
            else:
                first_seen[item.custom_id] = line_no
        if item is not None:
            yield item


def is_success(line: dict[str, Any]) -> bool:
    """Whether an output line is a 2xx answer (an error, or any other status, counts as failed)."""
    response = line.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    return line.get("error") is None and isinstance(status, int) and 200 <= status < 300


def output_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    """One batch output line, newline included, as the bytes written in a single write."""
    line = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


async def read_output(path: str | Path) -> tuple[ResumeState, int]:
    """What an output file holds, and the length of its intact part (everything up to a torn last line)."""
    state = ResumeState()
    intact = 0
    line_no = 0
    async for offset, raw, complete in iter_lines(path):
        line_no += 1
        if not complete:  # killed mid-write: cut it off; its request goes out again
            state.torn_bytes = len(raw)
            break
        intact = offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OutputFileError(f"{path} line {line_no} is not JSON ({exc}); not appending to it") from exc
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(custom_id, str):
            raise OutputFileError(f"{path} line {line_no} is not a batch output line; not appending to it")
        state.answered.add(custom_id)
        if not is_success(line):
            state.failed.add(custom_id)
        else:
            state.failed.discard(custom_id)
    return state, intact


async def _rewrite_without(path: Path, drop: set[str], intact: int) -> None:
    """Rewrite ``path`` without the lines of the ``drop`` custom_ids (and without a torn tail): a new file
    beside it, synced, then renamed over it, so a kill at any moment leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".rewrite")
    async with aiofiles.open(tmp, "wb") as out:
        kept: list[bytes] = []
        size = 0
        async for offset, raw, _ in iter_lines(path):
            if offset >= intact:
                break
            if raw.strip() and json.loads(raw)["custom_id"] in drop:
                continue
            kept.append(raw + b"\n")
            size += len(raw) + 1
            if size >= _CHUNK_BYTES:
                await out.write(b"".join(kept))
                kept, size = [], 0
        await out.write(b"".join(kept))
        await out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class OutputWriter:
    """The one task that appends to the output file: callers hand it whole lines with :meth:`put` (which never
    waits, so a cancelled request can never leave half a line), :meth:`close` drains the queue."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.written = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._file: Any = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, retry_failed: bool = False) -> ResumeState:
        """Lock the file (creating it), read what it holds, cut a torn tail off (or, with ``retry_failed``,
        rewrite it without the failed answers, whose requests then go out again), start the writer task."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await self._open_locked()
        try:
            state, intact = await read_output(self.path)
            if retry_failed and state.failed:
                await _rewrite_without(self.path, state.failed, intact)
                await self._file.close()  # that lock was on the old file, which the rename replaced
                self._file = await self._open_locked()
                state.answered -= state.failed
                state.dropped_failed, state.failed = len(state.failed), set()
            elif state.torn_bytes:
                await self._file.truncate(intact)
        except BaseException:
            await self._file.close()
            self._file = None
            raise
        self._task = asyncio.create_task(self._drain(), name="batch-output-writer")
        return state

    async def _open_locked(self) -> Any:
        file = await aiofiles.open(self.path, "ab")  # O_APPEND: every write lands at the end
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                await file.close()
                raise OutputFileError(f"another batch run is writing {self.path}") from exc
        return file

    def put(self, line: bytes) -> None:
        if self._task is None or self._task.done():
            self.check()
            raise RuntimeError("the output writer is not running")
        self._queue.put_nowait(line)

    def check(self) -> None:
        """Raise the writer task's error (a full disk, say) if it has failed."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def _drain(self) -> None:
        while (line := await self._queue.get()) is not None:
            await self._file.write(line)
            await self._file.flush()
            self.written += 1

    async def close(self) -> None:
        """Write every queued line, then release the file; raises the writer's error if it failed."""
        task = self._task
        try:
            if task is not None:
                if not task.done():
                    self._queue.put_nowait(None)
                await asyncio.shield(
                    task
                )  # the queued lines are answers: a cancelled close still writes them
        finally:
            # A close cancelled while the writer still runs leaves the file to it (closed at process exit).
            if self._file is not None and (task is None or task.done()):
                await self._file.close()
                self._file = None
