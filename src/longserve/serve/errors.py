"""API errors: one exception type carrying OpenAI's error fields and an HTTP status, and the handlers that
turn it (and FastAPI's own validation and HTTP errors) into ``{"error": {"message", "type", "param", "code"}}``.

Statuses: 400 bad request, 401 bad API key, 404 unknown model or route, 413 body too large, 429 every queue is
full (with Retry-After), 503 no worker can take the request (with Retry-After), 504 the request ran past
``request_timeout_s``. 500 is only ever a bug in this server; a worker's own error status and
body are passed through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from longserve.serve.worker_protocol import ErrorInfo

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # what a 503 asks clients to wait: about one controller dispatch/heartbeat round
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it, logs do

_DEFAULT_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}
# Pydantic puts union members and validator names into error locations ("prompt.list[int].0"); they are
# not request fields, so a field path stops at the first of them.
_NOT_FIELDS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def default_type(status: int) -> str:
    if status in _DEFAULT_TYPES:
        return _DEFAULT_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``; raise it anywhere below a route."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or default_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @classmethod
    def from_info(cls, info: ErrorInfo, status: int | None = None) -> APIError:
        """A worker's ErrorInfo; ``status`` (the HTTP status it came with) wins over the body's."""
        status = status or info.status
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        return cls(
            info.message, status=status, type=info.type, param=info.param, code=info.code, headers=headers
        )

    def info(self) -> ErrorInfo:
        return ErrorInfo(
            message=self.message, type=self.type, param=self.param, code=self.code, status=self.status
        )

    def body(self, path: str = "") -> dict[str, Any]:
        """The error's body for a request to ``path``: Anthropic's shape on the Messages routes, else OpenAI's."""
        if path.startswith(ANTHROPIC_PREFIX):
            return anthropic_error_body(self.status, self.message)
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client closed the connection; the request was abandoned (and its worker streams closed)."""


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


ANTHROPIC_PREFIX = "/v1/messages"  # routes whose errors are in Anthropic's shape
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def service_unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(message, status=503, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def too_many_requests(message: str) -> APIError:
    return APIError(
        message, status=429, code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def model_not_found(model: str) -> APIError:
    return APIError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")


def field_path(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages.0.content"``; None for the body as a whole."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in _NOT_FIELDS or "[" in part or "-" in part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's request validation failure as a 400 naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return APIError("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(f"Malformed JSON in request body: {reason}".rstrip(": "), code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        if first.get("type") == "missing":
            return APIError("A JSON request body is required")
        return APIError("The request body must be a JSON object sent with Content-Type: application/json")
    param = field_path(first.get("loc", ()))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise leaves it in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if exc.status == 429 and metrics is not None:
            metrics.rejected.labels("workers_full").inc()
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail), status=exc.status_code, headers=exc.headers)
        return error.response(request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return APIError("Internal server error", status=500, type="server_error").response(request.url.path)
