"""ASGI middleware of the API server: API-key check, request-body size limit, in-flight request limit (and the
refusal of new requests while draining).

Both are plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass through untouched and a
client disconnect still reaches the route.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from longserve.serve.errors import APIError, service_unavailable, too_many_requests

# A body declared too large is still read (and dropped) up to this much before answering 413: most HTTP/1.1
# clients write the whole body before they read a response, and would see a reset instead of the 413.
DRAIN_LIMIT_BYTES = 64 * 2**20
PROTECTED_PREFIX = "/v1"  # /health, /metrics, the docs and the web chat page (/, /static) stay open


async def send_error(send: Send, error: APIError, scope: Scope, close: bool = False) -> None:
    body = json.dumps(error.body(scope.get("path", ""))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if close:  # the request body was not (fully) read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``) names one of
    ``api_keys``; no keys configured: open."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        key = token.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"").strip()
        if not self._known(key):
            error = APIError(
                "Invalid or missing API key (send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                status=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await send_error(send, error, scope)
            return
        await self.app(scope, receive, send)

    def _known(self, token: bytes) -> bool:
        # Compare against every key, without stopping early, so timing does not tell which prefix matched.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(token, key)
        return found


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``, whether declared by Content-Length or only seen streaming in.

    The body is read here (it is needed whole for JSON anyway) and replayed to the app, so a chunked upload
    can never make the app buffer more than the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, 0, more=True)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # disconnected: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send, size, more=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, seen: int, more: bool) -> None:
        drained = seen
        while more and drained <= DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client is gone; nobody to answer
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        error = APIError(
            f"Request body too large: the limit is {self.max_bytes} bytes",
            status=413,
            code="request_too_large",
        )
        await send_error(send, error, scope, close=more)


@dataclass
class ServerLoad:
    """The API server's ``POST /v1/...`` requests being handled (streams count until they end), and whether
    it is draining (``api_server.drain``)."""

    in_flight: int = 0
    draining: bool = False


class InFlightLimitMiddleware:
    """429 at once for a ``POST /v1/...`` beyond ``max_in_flight`` being handled; 503 with Retry-After for a new
    one while the server drains (its load balancer sends it elsewhere).

    Without the limit a burst queues without bound in the API server itself, holding sockets and memory, and
    every client waits for minutes instead of hearing "retry later".
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, rejected: Counter, load: ServerLoad) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.rejected = rejected  # longserve:api_requests_rejected, labelled by reason
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limited = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith(PROTECTED_PREFIX)
        )
        if not limited:
            await self.app(scope, receive, send)
            return
        load = self.load
        if load.draining:
            self.rejected.labels("draining").inc()
            error = service_unavailable("the server is shutting down (draining); retry", code="draining")
            await send_error(send, error, scope, close=True)
            return
        if load.in_flight >= self.max_in_flight:
            self.rejected.labels("api_in_flight_limit").inc()
            error = too_many_requests(
                f"the server is handling {load.in_flight} requests, its limit; retry later"
            )
            await send_error(send, error, scope, close=True)  # the body was not read
            return
        load.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            load.in_flight -= 1
