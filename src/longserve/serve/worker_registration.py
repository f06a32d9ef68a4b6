"""Worker -> controller link: register (retrying with backoff), heartbeat, and register again when forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from longserve.serve.worker_protocol import (
    HeartBeatRequest,
    HeartBeatResponse,
    RegisterWorkerRequest,
    WorkerStatus,
)

log = logging.getLogger(__name__)

CONTROLLER_TIMEOUT_S = 5.0  # one register/heartbeat call; a hung controller must not stall the loop forever
REGISTER_FIRST_RETRY_S = (
    0.2  # backoff while the controller is not up yet: doubles up to the heartbeat interval
)


class ControllerLink:
    """Keeps one worker known to the controller, from a background task; never raises into the worker.

    The first registration runs in the background because the controller may start after the worker (or
    together with it, in one process). A heartbeat answered with ``exist=False`` (the controller restarted or
    expired us) leads straight to registering again.
    """

    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        heart_beat_interval_s: float,
        status: Callable[[], WorkerStatus],
    ) -> None:
        self.controller_address = controller_address.rstrip("/")
        self.worker_address = worker_address
        self.heart_beat_interval_s = heart_beat_interval_s
        self.status = status  # the worker's current status, sent on registration (queue length on heartbeats)
        self.num_registrations = 0  # successful register_worker calls
        self.num_heart_beats = 0  # heartbeats the controller answered
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=CONTROLLER_TIMEOUT_S)
            self._task = asyncio.create_task(self._run(), name="worker-controller-link")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _run(self) -> None:
        while True:
            await self._register_until_accepted()
            while True:
                await asyncio.sleep(self.heart_beat_interval_s)
                if not await self._heart_beat():
                    log.info(
                        "controller %s does not know this worker; registering again", self.controller_address
                    )
                    break

    async def _register_until_accepted(self) -> None:
        delay = REGISTER_FIRST_RETRY_S
        failures = 0
        while True:
            body = RegisterWorkerRequest(worker_address=self.worker_address, worker_status=self.status())
            try:
                response = await self._client.post(
                    f"{self.controller_address}/register_worker", json=body.model_dump()
                )
                response.raise_for_status()
                self.num_registrations += 1
                log.info("registered %s with controller %s", self.worker_address, self.controller_address)
                return
            except Exception as exc:  # a missing or broken controller must never take the worker down
                failures += 1
                # The first failure is expected when everything starts together; say more only if it lasts.
                level = logging.INFO if failures == 1 else logging.WARNING
                log.log(level, "cannot register with controller %s: %r", self.controller_address, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max(self.heart_beat_interval_s, REGISTER_FIRST_RETRY_S))

    async def _heart_beat(self) -> bool:
        """False only when the controller answers that it does not know this worker."""
        body = HeartBeatRequest(worker_address=self.worker_address, queue_length=self.status().queue_length)
        try:
            response = await self._client.post(
                f"{self.controller_address}/receive_heart_beat", json=body.model_dump()
            )
            response.raise_for_status()
            exist = HeartBeatResponse.model_validate(response.json()).exist
        except Exception as exc:  # unreachable for now: keep beating; once back, it answers exist=False
            log.warning("heartbeat to controller %s failed: %r", self.controller_address, exc)
            return True
        self.num_heart_beats += 1
        return exist
