"""Worker -> controller link: register once the worker answers at its own address (retrying quietly with
backoff while the controller is not up yet), heartbeat, and register again when forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
    0.05  # backoff while the controller is not up yet: doubles up to the heartbeat interval
)
REGISTER_QUIET_S = (
    30.0  # failing to register for this long is an error worth a line; before it, it is start-up
)
SELF_CHECK_TIMEOUT_S = 30.0  # wait this long for our own /live before registering anyway (with a warning)
READY_POLL_S = 0.5  # how soon the controller hears that the engine went down or came back


class ControllerLink:
    """Keeps one worker known to the controller, from a background task; never raises into the worker.

    The first registration runs in the background because the controller may start after the worker (or
    together with it, in one process), and only once the worker answers ``GET /live`` at its own address: the
    controller must never hand out a worker that is not listening yet. A heartbeat answered with
    ``exist=False`` (the controller restarted or expired us) leads straight to registering again. A change of
    ``status().ready`` (the engine went down or came back) is sent at once, not at the next heartbeat.
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
        self.registered = asyncio.Event()  # set by the first successful registration
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self.closing = False  # the worker is stopping: a controller that went first is no news

    async def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=CONTROLLER_TIMEOUT_S)
            self._task = asyncio.create_task(self._run(), name="worker-controller-link")

    async def update(self) -> None:
        """Send the worker's status now (the models it serves changed), so the controller routes by it at
        once; a controller out of reach hears it when this link registers again."""
        if self._client is None or not self.registered.is_set():
            return  # the first registration will carry it
        body = RegisterWorkerRequest(worker_address=self.worker_address, worker_status=self.status())
        try:
            response = await self._client.post(
                f"{self.controller_address}/register_worker", json=body.model_dump()
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(
                "cannot tell controller %s about this worker's models: %r", self.controller_address, exc
            )

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
        await self._wait_until_listening()
        while True:
            await self._register_until_accepted()
            if not await self._heart_beat_until_forgotten():
                log.info(
                    "controller %s does not know this worker; registering again", self.controller_address
                )

    async def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + SELF_CHECK_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await self._client.get(f"{self.worker_address}/live", timeout=1.0)).status_code == 200:
                    return
            await asyncio.sleep(REGISTER_FIRST_RETRY_S)
        log.warning(
            "this worker does not answer at its own address %s after %.0f s; registering anyway",
            self.worker_address,
            SELF_CHECK_TIMEOUT_S,
        )

    async def _register_until_accepted(self) -> None:
        delay = REGISTER_FIRST_RETRY_S
        started = time.monotonic()
        reported = False
        while True:
            body = RegisterWorkerRequest(worker_address=self.worker_address, worker_status=self.status())
            try:
                response = await self._client.post(
                    f"{self.controller_address}/register_worker", json=body.model_dump()
                )
                response.raise_for_status()
                self.num_registrations += 1
                self.registered.set()
                log.info("registered %s with controller %s", self.worker_address, self.controller_address)
                return
            except Exception as exc:  # a missing or broken controller must never take the worker down
                # Failing at first is expected when everything starts together; only a lasting failure is one.
                if not reported and time.monotonic() - started > REGISTER_QUIET_S:
                    reported = True
                    log.error(
                        "cannot register with controller %s for %.0f s (still trying): %r",
                        self.controller_address,
                        REGISTER_QUIET_S,
                        exc,
                    )
                else:
                    log.debug("cannot register with controller %s: %r", self.controller_address, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max(self.heart_beat_interval_s, REGISTER_FIRST_RETRY_S))

    async def _heart_beat_until_forgotten(self) -> bool:
        """Heartbeat every interval, and at once when readiness changes; returns False when forgotten."""
        ready, names = self.status().ready, self.status().model_names
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(READY_POLL_S, self.heart_beat_interval_s))
            if self.status().model_names != names:
                return False  # adapters came or went: register again, with the new names
            now_ready = self.status().ready
            if now_ready == ready and time.monotonic() - last < self.heart_beat_interval_s:
                continue
            ready, last = now_ready, time.monotonic()
            if not await self._heart_beat(ready):
                return False

    async def _heart_beat(self, ready: bool) -> bool:
        """False only when the controller answers that it does not know this worker."""
        body = HeartBeatRequest(
            worker_address=self.worker_address, queue_length=self.status().queue_length, ready=ready
        )
        try:
            response = await self._client.post(
                f"{self.controller_address}/receive_heart_beat", json=body.model_dump()
            )
            response.raise_for_status()
            exist = HeartBeatResponse.model_validate(response.json()).exist
        except Exception as exc:  # unreachable for now: keep beating; once back, it answers exist=False
            # A worker going down tells the controller if it can; in `serve` the controller stops meanwhile.
            level = logging.DEBUG if self.closing else logging.WARNING if ready else logging.INFO
            log.log(level, "heartbeat to controller %s failed: %r", self.controller_address, exc)
            return True
        self.num_heart_beats += 1
        return exist
