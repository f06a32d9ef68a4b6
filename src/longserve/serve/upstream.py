"""The API server's side of the controller and worker protocol: which worker serves a model, its front-end
information, opening a request's stream on a worker's channel (``frontend``, ``engine_channel``), calling it,
and failing over to another worker when the chosen one cannot take the request.

Failover happens only before a worker has accepted: a refused or timed-out connection, a connection dropped
before any response, a 503 from a worker that is shutting down, or a 429 from one whose queue is full.
Generation has no side effects, so sending the request again elsewhere is safe; once a worker has accepted,
its answer (or its error) is final. A worker that times out is reported to the controller, which skips it until
its next heartbeat. Every call to a worker has a timeout: nothing waits forever on a frozen one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from longserve.engine.protocol import EngineRequest
from longserve.serve.engine_channel import EngineChannel, NotAccepted, Sink
from longserve.serve.errors import APIError, model_not_found, service_unavailable
from longserve.serve.frontend import FrontendDirectory, ModelFrontend
from longserve.serve.worker_protocol import (
    ErrorInfo,
    FrontendInfo,
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    ListModelsResponse,
    ListWorkersResponse,
    LoadLoRARequest,
    ReportWorkerRequest,
    UnloadLoRARequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")

# A refused connection fails at once whatever these say. The connect timeouts cover a host that does not
# answer; they are generous because in `longserve serve` the three servers share one busy event loop, where
# 3 s connects were seen firing under a burst although nothing was down.
CONNECT_TIMEOUT_S = 10.0
WORKER_CALL_TOTAL_S = (
    600.0  # embeddings of a large batch: bounded as a whole, and by silence (worker timeout)
)
CONTROLLER_TIMEOUT = aiohttp.ClientTimeout(total=30.0, sock_connect=CONNECT_TIMEOUT_S)
REPORT_TIMEOUT = aiohttp.ClientTimeout(total=2.0)  # telling the controller about a stuck worker: best effort
# Idle pooled connections are dropped before Uvicorn's 5 s keep-alive closes them on the other side: reusing
# one as the server closes it fails the write ("Can not write request body"), which looked like a dead worker.
KEEPALIVE_EXPIRY_S = 3.0
_JSON = {"content-type": "application/json"}
# "The worker never answered": refused, reset or dropped before a response (ClientOSError,
# ServerDisconnectedError), or silent past a timeout. Nothing was generated; another worker may try.
_NO_ANSWER = (aiohttp.ClientConnectionError, TimeoutError)


def make_session() -> aiohttp.ClientSession:
    """The app's client for the controller and the workers' HTTP calls; create it on the app's event loop.
    Every call carries its own timeout."""
    return aiohttp.ClientSession(
        # A burst of requests each asks the controller at once: the pool must not be what limits them.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY_S),
        trust_env=False,
    )


def worker_error(status: int, content: bytes) -> APIError:
    """A worker's HTTP error as the same status and body (an ErrorInfo, or whatever FastAPI said)."""
    try:
        return APIError.from_info(ErrorInfo.model_validate_json(content), status=status)
    except ValidationError:
        pass
    text = content.decode("utf-8", errors="replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    return APIError(f"worker error: {detail}", status=status)


class Upstream:
    """Finds workers through the controller and sends them requests, failing over before they answer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        controller_address: str,
        connect_retries: int,
        worker_timeout_s: float,
        worker_keepalive_s: float,
        request_timeout_s: float | None = None,
        request_stall_timeout_s: float | None = None,
        sse_keepalive_s: float = 15.0,
    ) -> None:
        self.session = session
        # worker_timeout_s: the most a worker may stay silent, on its stream or answering a call.
        self.frontends = FrontendDirectory(worker_timeout_s, worker_keepalive_s, self._report_soon)
        self.call_timeout = aiohttp.ClientTimeout(
            total=WORKER_CALL_TOTAL_S, sock_connect=CONNECT_TIMEOUT_S, sock_read=worker_timeout_s
        )
        self._reports: set[asyncio.Task] = set()
        self.controller_address = controller_address.rstrip("/")
        self.connect_retries = max(0, connect_retries)
        self.request_timeout_s = request_timeout_s  # a whole generation request; None: no limit
        self.request_stall_timeout_s = request_stall_timeout_s  # between a request's deltas; None: no limit
        self.sse_keepalive_s = sse_keepalive_s  # SSE comment to the client after this long without an event
        # Set when the API server begins to stop: open generations end with an error event, then [DONE].
        self.stopping = asyncio.Event()

    # ---- controller ---------------------------------------------------------------------------------------

    async def _post(self, url: str, content: bytes, timeout: aiohttp.ClientTimeout) -> tuple[int, bytes]:
        async with self.session.post(url, data=content, headers=_JSON, timeout=timeout) as response:
            return response.status, await response.read()

    async def _controller(self, path: str, body: BaseModel | None, response_type: type[T]) -> T:
        content = b"{}" if body is None else body.model_dump_json().encode()
        try:
            status, data = await self._post(f"{self.controller_address}{path}", content, CONTROLLER_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("controller %s unreachable: %r", self.controller_address, exc)
            raise service_unavailable("the controller is unreachable", code="controller_unreachable") from exc
        if status != 200:
            raise service_unavailable(f"the controller answered {path} with HTTP {status}")
        try:
            return response_type.model_validate_json(data)
        except ValidationError as exc:
            raise service_unavailable(f"the controller sent a malformed {path} answer") from exc

    async def report_unresponsive(self, address: str, reason: str) -> None:
        """Ask the controller to skip ``address`` until its next heartbeat; failures are only logged."""
        content = ReportWorkerRequest(worker_address=address, reason=reason).model_dump_json().encode()
        url = f"{self.controller_address}/report_unresponsive_worker"
        try:
            status, _ = await self._post(url, content, REPORT_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = repr(exc)
        if status != 200:
            log.warning("could not report worker %s to the controller: %s", address, status)

    def _report_soon(self, address: str, reason: str) -> None:
        task = asyncio.create_task(self.report_unresponsive(address, reason))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def aclose(self) -> None:
        self.frontends.close()
        await asyncio.gather(*self._reports, return_exceptions=True)

    async def list_models(self) -> list[str]:
        return (await self.model_details()).models

    async def model_details(self) -> ListModelsResponse:
        """The models live workers serve, with each one's context length."""
        return await self._controller("/list_models", None, ListModelsResponse)

    async def load_lora(self, body: LoadLoRARequest | UnloadLoRARequest) -> list[str]:
        """Load an adapter into every live worker it fits (unload it from every worker that has it); the
        addresses that did. When none did, the first worker's refusal is raised (404: none serves it)."""
        workers = (await self._controller("/list_workers", None, ListWorkersResponse)).workers
        loading = isinstance(body, LoadLoRARequest)
        addresses = [
            w.worker_address
            for w in workers
            if w.status.ready and (loading or body.lora_name in w.status.lora_parents)
        ]
        if not addresses:
            if loading:
                raise service_unavailable("no worker is ready to load the adapter", code="no_worker")
            raise APIError(
                f"LoRA adapter {body.lora_name!r} is not loaded", status=404, param="lora_name",
                code="model_not_found",
            )  # fmt: skip
        path = "/load_lora_adapter" if loading else "/unload_lora_adapter"
        content = body.model_dump_json().encode()
        answers = await asyncio.gather(
            *(self._post(f"{address}{path}", content, self.call_timeout) for address in addresses),
            return_exceptions=True,
        )
        done, errors = [], []
        for address, answer in zip(addresses, answers, strict=True):
            if isinstance(answer, BaseException):
                errors.append(
                    service_unavailable(f"worker {address} failed: {answer!r}", code="worker_failed")
                )
            elif answer[0] >= 400:
                errors.append(worker_error(*answer))
            else:
                done.append(address)
        if not loading:
            self.frontends.forget(body.lora_name)
        if not done:
            raise errors[0]
        return done

    async def pick_worker(
        self,
        model: str,
        exclude: list[str],
        fingerprint: list[int] | None = None,
        dispatch: bool = True,
    ) -> str:
        """A worker address for ``model``: 404 if no worker ever serves it, 503 if none can take it now.
        ``dispatch=False``: a look-up that the controller does not count as load."""
        request = GetWorkerAddressRequest(
            model=model, exclude=exclude, fingerprint=fingerprint or [], dispatch=dispatch
        )
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

    async def _with_failover(
        self,
        model: str,
        attempt: Callable[[str], Awaitable[R]],
        fingerprint: list[int] | None = None,
        dispatch: bool = True,
    ) -> R:
        """``attempt(address)`` on a worker the controller picks; one that raises ``_TryAnother`` (it never
        answered, or answered 503) is excluded and another asked."""
        exclude: list[str] = []
        last_error: APIError | None = None
        for _ in range(self.connect_retries + 1):
            try:
                address = await self.pick_worker(model, exclude, fingerprint, dispatch)
            except APIError:
                if last_error is not None:  # the controller has no one else: report what the last one said
                    raise last_error from None
                raise
            try:
                return await attempt(address)
            except _TryAnother as exc:
                exclude.append(address)
                last_error = exc.error
                if exc.timed_out:
                    await self.report_unresponsive(address, str(exc))
        assert last_error is not None  # the loop ran at least once and every pass set it or returned
        raise last_error

    async def call_worker(self, model: str, path: str, body: BaseModel, response_type: type[T]) -> T:
        """A JSON request/response call to a worker of ``model`` (embeddings, ...)."""
        return await self._with_failover(
            model, lambda address: self._call_address(address, path, body, response_type)
        )

    async def _call_address(
        self, address: str, path: str, body: BaseModel | None, response_type: type[T]
    ) -> T:
        content = b"{}" if body is None else body.model_dump_json().encode()
        try:
            status, data = await self._post(f"{address}{path}", content, self.call_timeout)
        except _NO_ANSWER as exc:
            raise _TryAnother.unreachable(address, path, exc) from exc
        except aiohttp.ClientError as exc:
            raise service_unavailable(f"worker {address} failed: {exc!r}", code="worker_failed") from exc
        if status in _TRY_ANOTHER_STATUS:
            raise _TryAnother(worker_error(status, data))
        if status >= 400:
            raise worker_error(status, data)
        try:
            return response_type.model_validate_json(data)
        except ValidationError as exc:
            raise APIError(f"worker sent a malformed {path} answer", status=500) from exc

    async def frontend(self, model: str) -> ModelFrontend:
        """``model``'s tokenizer, template and limits (fetched from one of its workers the first time)."""

        async def fetch() -> FrontendInfo:
            return await self._with_failover(model, self._frontend_info, dispatch=False)

        return await self.frontends.model(model, fetch)

    async def _frontend_info(self, address: str) -> FrontendInfo:
        return await self._call_address(address, "/frontend_info", None, FrontendInfo)

    async def open_stream(
        self, model: str, request: EngineRequest, sink: Sink, fingerprint: list[int] | None = None
    ) -> EngineChannel:
        """Start ``request`` on a worker of ``model`` (``fingerprint``: its prompt's, for cache-aware
        dispatch); its deltas go to ``sink``. Returns the channel it runs on (to abort it)."""

        async def attempt(address: str) -> EngineChannel:
            channel = await self.frontends.channel(address, lambda: self._frontend_info(address))
            try:
                await channel.submit(request, sink)
            except NotAccepted as exc:
                error = APIError.from_info(exc.info)
                if exc.timed_out:
                    channel.close(str(exc))  # frozen: its other requests will not hear back either
                if exc.timed_out or exc.info.status in _TRY_ANOTHER_STATUS:
                    raise _TryAnother(error, exc.timed_out) from exc
                raise error from exc
            return channel

        return await self._with_failover(model, attempt, fingerprint)


# 503: shutting down or out of KV cache; 429: its queue is full. Another worker may take the request.
_TRY_ANOTHER_STATUS = (429, 503)


class _TryAnother(Exception):
    """This worker cannot serve the request, and nothing was generated: ``error`` if no other worker can."""

    def __init__(self, error: APIError, timed_out: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.timed_out = timed_out  # it accepted the connection but said nothing: likely frozen

    @classmethod
    def unreachable(cls, address: str, path: str, exc: Exception) -> _TryAnother:
        log.warning("worker %s did not answer %s (%r); trying another", address, path, exc)
        timed_out = isinstance(exc, TimeoutError)
        what = "did not answer in time" if timed_out else "is unreachable"
        return cls(service_unavailable(f"worker {address} {what}", code="worker_unreachable"), timed_out)
