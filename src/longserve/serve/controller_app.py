"""The controller's HTTP API (``worker_protocol``) around one ``Controller``, with worker expiry in the background.

Workers register and heartbeat; API servers list models and ask for a worker per request; refresh_all_workers
polls every worker's status and drops those that do not answer. The launcher (serve/launcher.py) serves the
app with Uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from longserve.config import ServeConfig
from longserve.serve.controller import Controller
from longserve.serve.worker_protocol import (
    ControllerStatus,
    ErrorInfo,
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    HeartBeatRequest,
    HeartBeatResponse,
    ListModelsResponse,
    ListWorkersResponse,
    RegisterWorkerRequest,
    ReportWorkerRequest,
    WorkerStatus,
)

logger = logging.getLogger(__name__)

# A worker that takes longer than this to report its status during refresh_all_workers is treated as gone.
REFRESH_TIMEOUT_S = 5.0


@dataclass
class ControllerAppState:
    """Everything the controller app holds, attached as ``app.state.controller_state``."""

    config: ServeConfig
    controller: Controller
    client: httpx.AsyncClient | None = None  # for refresh_all_workers; opened by the lifespan
    expiry_task: asyncio.Task[None] | None = None
    expiry_period_s: float = field(init=False)

    def __post_init__(self) -> None:
        # Sweep several times per expiration window so a dead worker is dropped soon after its deadline.
        self.expiry_period_s = min(self.config.heart_beat_interval_s, self.config.heart_beat_expiration_s / 3)


async def _expiry_loop(state: ControllerAppState) -> None:
    while True:
        await asyncio.sleep(state.expiry_period_s)
        try:
            state.controller.expire()
        except Exception:  # a bug in one sweep must not stop expiry for the controller's lifetime
            logger.exception("worker expiry sweep failed")


async def _poll_worker(client: httpx.AsyncClient, address: str) -> WorkerStatus | None:
    try:
        response = await client.post(f"{address}/worker_get_status", timeout=REFRESH_TIMEOUT_S)
        response.raise_for_status()
        return WorkerStatus.model_validate(response.json())
    except (httpx.HTTPError, ValueError, ValidationError) as exc:  # ValueError: body is not JSON
        logger.warning("worker %s did not answer worker_get_status: %r", address, exc)
        return None


async def refresh_all_workers(state: ControllerAppState) -> None:
    """Poll every worker's status at once; drop those that do not answer."""
    assert state.client is not None, "refresh_all_workers needs the app's lifespan to have started"
    addresses = state.controller.worker_addresses()
    statuses = await asyncio.gather(*(_poll_worker(state.client, address) for address in addresses))
    for address, status in zip(addresses, statuses, strict=True):
        if status is None:
            state.controller.remove(address)
        else:
            # A worker removed or re-registered while we awaited is left as it now is (update is a no-op).
            state.controller.update_status(address, status)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # The protocol's error shape, so workers and the API server parse one format for every rejection.
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    info = ErrorInfo(
        message=f"invalid request: {first.get('msg', 'malformed body')}",
        param=".".join(loc) or None,
        status=400,
    )
    return JSONResponse(status_code=400, content=info.model_dump())


def create_controller_app(config: ServeConfig, controller: Controller | None = None) -> FastAPI:
    """The controller's HTTP API; ``controller`` defaults to one built from ``config``."""
    state = ControllerAppState(config=config, controller=controller or Controller.from_config(config))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # trust_env=False: controller<->worker traffic is internal and must not go through an HTTP proxy.
        state.client = httpx.AsyncClient(trust_env=False)
        state.expiry_task = asyncio.create_task(_expiry_loop(state), name="controller-expiry")
        try:
            yield
        finally:
            state.expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.expiry_task
            await state.client.aclose()

    app = FastAPI(title="longserve controller", lifespan=lifespan)
    app.state.controller_state = state
    app.add_exception_handler(RequestValidationError, _validation_error)

    def get_state(request: Request) -> ControllerAppState:
        return request.app.state.controller_state

    # Every handler is `async def` so it runs on the event loop: the Controller is not thread-safe, and a plain
    # `def` handler would run in FastAPI's thread pool concurrently with the expiry task.

    @app.post("/register_worker")
    async def register_worker(body: RegisterWorkerRequest, request: Request) -> dict[str, bool]:
        get_state(request).controller.register(body.worker_address, body.worker_status, body.check_heart_beat)
        return {"ok": True}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(body: HeartBeatRequest, request: Request) -> HeartBeatResponse:
        exist = get_state(request).controller.heart_beat(body.worker_address, body.queue_length, body.ready)
        return HeartBeatResponse(exist=exist)

    @app.post("/list_models")
    async def list_models(request: Request) -> ListModelsResponse:
        controller = get_state(request).controller
        return ListModelsResponse(
            models=controller.list_models(),
            context_lengths=controller.context_lengths(),
            embeddings=controller.embedding_details(),
            lora_parents=controller.lora_parents(),
        )

    @app.post("/list_workers")
    async def list_workers(request: Request) -> ListWorkersResponse:
        return ListWorkersResponse(workers=get_state(request).controller.list_workers())

    @app.post("/get_worker_address")
    async def get_worker_address(body: GetWorkerAddressRequest, request: Request) -> GetWorkerAddressResponse:
        controller = get_state(request).controller
        address = controller.get_worker_address(body.model, body.exclude, body.fingerprint, body.dispatch)
        return GetWorkerAddressResponse(address=address)

    @app.post("/report_unresponsive_worker")
    async def report_unresponsive_worker(body: ReportWorkerRequest, request: Request) -> dict[str, bool]:
        return {"ok": get_state(request).controller.suspend(body.worker_address, body.reason)}

    @app.post("/worker_get_status")
    async def worker_get_status(request: Request) -> ControllerStatus:
        return get_state(request).controller.status()

    @app.post("/refresh_all_workers")
    async def refresh(request: Request) -> ListWorkersResponse:
        state = get_state(request)
        await refresh_all_workers(state)
        return ListWorkersResponse(workers=state.controller.list_workers())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/live")
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    return app
