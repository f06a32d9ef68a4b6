"""One batch request over HTTP: attempts, retries with backoff (retry.py), and the output line it ends as.

429, 5xx gateway/overload answers, connection errors and timeouts are retried; any other status is the
request's own answer and is written as it came (as OpenAI's batch does), a non-JSON body wrapped in an
OpenAI-shaped error. Giving up on a retryable failure writes an error line (``response: null``). 401/403 raise
:class:`BatchAuthError` instead: a wrong key would otherwise answer every line of the file with it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from longserve.clients.batch_io import BatchRequest, OutputWriter, output_line
from longserve.clients.retry import RetryPolicy, parse_retry_after

_MESSAGE_CHARS = 2000  # of a non-JSON error body kept in the output line


class BatchAuthError(RuntimeError):
    """The server refused the credentials (401/403): the run stops rather than answer every line with it."""


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt: an answer (status + JSON body) or a transport failure (error)."""

    status: int | None = None
    body: dict[str, Any] | None = None
    request_id: str | None = None
    retry_after_s: float | None = None
    error: dict[str, str] | None = None  # {"code", "message"} when no answer came

    @property
    def retryable(self) -> bool:
        return self.error is not None or RetryPolicy.should_retry_status(self.status or 0)


@dataclass(frozen=True)
class Outcome:
    """One request's final answer, already handed to the writer."""

    ok: bool
    tokens: int
    retries: int


def _decode_body(raw: bytes, status: int) -> dict[str, Any]:
    """The answer's JSON object; a non-JSON body (a proxy's HTML page, say) becomes an OpenAI-shaped error."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        return body
    text = raw.decode("utf-8", "replace")[:_MESSAGE_CHARS]
    return {"error": {"message": f"HTTP {status}, not a JSON object: {text}", "type": "invalid_response"}}


def _error_message(attempt: Attempt) -> str:
    if attempt.error is not None:
        return attempt.error["message"]
    error = (attempt.body or {}).get("error")
    return str(error.get("message") if isinstance(error, dict) else error)[:_MESSAGE_CHARS]


class Sender:
    """Sends one request with retries over a shared session and hands its output line to the writer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        writer: OutputWriter,
        policy: RetryPolicy,
        concurrency: int,
        timeout_s: float,
        stop: asyncio.Event,
    ) -> None:
        self.session, self.base_url, self.writer, self.policy = session, base_url.rstrip("/"), writer, policy
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.stop = stop

    async def answer(self, request: BatchRequest) -> Outcome | None:
        """Send until answered for good; None if the run was stopped first (nothing written: it resumes)."""
        url = self.base_url + request.url.removeprefix("/v1")
        retries = 0
        while True:
            async with self.slots:
                if self.stop.is_set():
                    return None
                attempt = await self._send(url, request.body)
            if attempt.status in (401, 403):
                raise BatchAuthError(f"{url}: HTTP {attempt.status}: {_error_message(attempt)}")
            if not attempt.retryable or retries >= self.policy.max_retries:
                break
            delay = self.policy.delay(retries, attempt.retry_after_s)
            retries += 1
            try:  # back off, unless the run is stopped meanwhile
                await asyncio.wait_for(self.stop.wait(), delay)
                return None
            except TimeoutError:
                pass
        ok = attempt.error is None and attempt.status is not None and 200 <= attempt.status < 300
        if attempt.retryable:  # gave up: no final answer from the server, so an error line
            code = attempt.error["code"] if attempt.error else f"http_{attempt.status}"
            message = f"{_error_message(attempt)} (gave up after {retries + 1} attempts)"
            self.writer.put(output_line(request.custom_id, None, {"code": code, "message": message}))
            return Outcome(ok=False, tokens=0, retries=retries)
        response = {"status_code": attempt.status, "request_id": attempt.request_id, "body": attempt.body}
        self.writer.put(output_line(request.custom_id, response, None))
        usage = (attempt.body or {}).get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        return Outcome(ok=ok, tokens=tokens if isinstance(tokens, int) else 0, retries=retries)

    async def _send(self, url: str, body: dict[str, Any]) -> Attempt:
        try:
            async with self.session.post(url, json=body, timeout=self.timeout) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except TimeoutError:  # aiohttp's read/connect timeouts are TimeoutErrors too
            return Attempt(error={"code": "timeout", "message": f"no answer within {self.timeout.total} s"})
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            return Attempt(error={"code": "connection_error", "message": f"{type(exc).__name__}: {exc}"})
        decoded = _decode_body(raw, status)
        request_id = headers.get("x-request-id") or decoded.get("id")
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return Attempt(status, decoded, str(request_id) if request_id else None, retry_after)
