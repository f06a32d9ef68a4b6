"""The API server's side of the controller and worker protocol: which worker serves a model, calling it, and
failing over to another worker when the chosen one cannot be reached.

Failover happens only before a worker has answered: a refused or timed-out connection, a connection dropped
before any response, or a 503 from a worker that is shutting down. Generation has no side effects, so sending
the request again elsewhere is safe; once a worker has answered, its answer (or its error) is final.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from longserve.serve.errors import APIError, model_not_found, service_unavailable
from longserve.serve.worker_protocol import (
    ErrorInfo,
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    ListModelsResponse,
)

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# Connecting must fail fast so failover is quick; a stream may legitimately wait minutes for tokens.
WORKER_TIMEOUT = httpx.Timeout(connect=3.0, read=None, write=30.0, pool=30.0)
WORKER_CALL_TIMEOUT = httpx.Timeout(600.0, connect=3.0)  # chat template, embeddings: bounded
CONTROLLER_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
# Errors meaning "the worker never answered": nothing was generated for this request, another worker may try.
_NO_ANSWER = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


def make_client() -> httpx.AsyncClient:
    """The app's one client for the controller and workers."""
    return httpx.AsyncClient(
        # Every open stream holds a connection, so the pool must not be what limits concurrency.
        limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256),
        timeout=WORKER_TIMEOUT,
        trust_env=False,  # cluster-internal addresses: never through an HTTP(S)_PROXY from the environment
    )


def worker_error(response: httpx.Response) -> APIError:
    """A worker's HTTP error as the same status and body (an ErrorInfo, or whatever FastAPI said)."""
    try:
        return APIError.from_info(
            ErrorInfo.model_validate_json(response.content), status=response.status_code
        )
    except ValidationError:
        pass
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return APIError(f"worker error: {detail}", status=response.status_code)


class Upstream:
    """Finds workers through the controller and sends them requests, failing over before they answer."""

    def __init__(self, client: httpx.AsyncClient, controller_address: str, connect_retries: int) -> None:
        self.client = client
        self.controller_address = controller_address.rstrip("/")
        self.connect_retries = max(0, connect_retries)

    # ---- controller ---------------------------------------------------------------------------------------

    async def _controller(self, path: str, body: BaseModel | None, response_type: type[T]) -> T:
        try:
            response = await self.client.post(
                f"{self.controller_address}{path}",
                json=None if body is None else body.model_dump(),
                timeout=CONTROLLER_TIMEOUT,
            )
        except httpx.TransportError as exc:
            log.warning("controller %s unreachable: %r", self.controller_address, exc)
            raise service_unavailable("the controller is unreachable", code="controller_unreachable") from exc
        if response.status_code != 200:
            raise service_unavailable(f"the controller answered {path} with HTTP {response.status_code}")
        try:
            return response_type.model_validate_json(response.content)
        except ValidationError as exc:
            raise service_unavailable(f"the controller sent a malformed {path} answer") from exc

    async def list_models(self) -> list[str]:
        return (await self._controller("/list_models", None, ListModelsResponse)).models

    async def pick_worker(self, model: str, exclude: list[str]) -> str:
        """A worker address for ``model``: 404 if no worker ever serves it, 503 if none can take it now."""
        request = GetWorkerAddressRequest(model=model, exclude=exclude)
        address = (await self._controller("/get_worker_address", request, GetWorkerAddressResponse)).address
        if address:
            return address.rstrip("/")
        if exclude:
            raise service_unavailable(
                f"no reachable worker for model {model!r} (tried {', '.join(exclude)})", code="no_worker"
            )
        # An empty answer is ambiguous: tell an unknown model (the client's mistake) from a busy one.
        if model not in await self.list_models():
            raise model_not_found(model)
        raise service_unavailable(f"no worker can take a request for model {model!r} now", code="no_worker")

    # ---- workers ------------------------------------------------------------------------------------------

    async def _send(self, model: str, path: str, body: BaseModel, *, stream: bool) -> httpx.Response:
        """POST to some worker of ``model``; a worker that does not answer is excluded and another asked."""
        content = body.model_dump_json().encode()
        exclude: list[str] = []
        last_error: APIError | None = None
        for _ in range(self.connect_retries + 1):
            try:
                address = await self.pick_worker(model, exclude)
            except APIError:
                if last_error is not None:  # the controller has no one else: report what the last one said
                    raise last_error from None
                raise
            request = self.client.build_request(
                "POST",
                f"{address}{path}",
                content=content,
                headers={"content-type": "application/json"},
                timeout=WORKER_TIMEOUT if stream else WORKER_CALL_TIMEOUT,
            )
            try:
                response = await self.client.send(request, stream=stream)
            except _NO_ANSWER as exc:
                log.warning("worker %s did not answer %s (%r); trying another", address, path, exc)
                exclude.append(address)
                last_error = service_unavailable(
                    f"worker {address} is unreachable", code="worker_unreachable"
                )
                continue
            except httpx.TransportError as exc:
                raise service_unavailable(f"worker {address} failed: {exc!r}", code="worker_failed") from exc
            if response.status_code == 503:  # shutting down or out of capacity: another worker may do
                if stream:
                    await response.aread()
                    await response.aclose()
                last_error = worker_error(response)
                exclude.append(address)
                continue
            return response
        assert last_error is not None  # the loop ran at least once and every pass set it or returned
        raise last_error

    async def call_worker(self, model: str, path: str, body: BaseModel, response_type: type[T]) -> T:
        """A JSON request/response call to a worker of ``model`` (chat template, embeddings, ...)."""
        response = await self._send(model, path, body, stream=False)
        if response.status_code >= 400:
            raise worker_error(response)
        try:
            return response_type.model_validate_json(response.content)
        except ValidationError as exc:
            raise APIError(f"worker sent a malformed {path} answer", status=500) from exc

    @contextlib.asynccontextmanager
    async def open_stream(self, model: str, path: str, body: BaseModel) -> AsyncIterator[httpx.Response]:
        """A worker's streamed answer; leaving the block closes it, which makes the worker abort the request."""
        response = await self._send(model, path, body, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                raise worker_error(response)
            yield response
        finally:
            await response.aclose()
