"""The controller: a registry of model workers and the dispatcher that picks one for each request.

``Controller`` is the pure logic (no FastAPI, no I/O): workers register with their ``WorkerStatus``, send
heartbeats carrying their queue length, and are dropped when silent for longer than
``heart_beat_expiration_s``. ``get_worker_address`` picks a live worker serving a model, by ``shortest_queue``
(least ``queue_length / speed``), ``lottery`` (random, weighted by speed) or ``cache_aware`` (where its prefix
went last, unless that worker is much busier). A worker an API server reports unresponsive (it timed out) is
skipped until its next heartbeat.

``controller_app.create_controller_app`` wraps it in the HTTP API of ``worker_protocol``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from longserve.config import ServeConfig
from longserve.serve.prefix_routing import PrefixIndex
from longserve.serve.worker_protocol import (
    ControllerStatus,
    EmbeddingDetails,
    WorkerInfo,
    WorkerStatus,
)

logger = logging.getLogger(__name__)

DISPATCH_METHODS = ("shortest_queue", "lottery", "cache_aware")
# cache_aware sends a prompt to the worker that last got the longest part of its prefix, unless that worker
# has this many more requests in flight (per unit of speed) than the least loaded one: a cache hit saves a
# prefill, a long queue costs every request in it.
CACHE_AWARE_MAX_IMBALANCE = 8.0


def _normalize(address: str) -> str:
    # "http://h:1/" and "http://h:1" name the same worker; the API server's exclude list must match either.
    return address.rstrip("/")


@dataclass
class _WorkerRecord:
    status: WorkerStatus
    last_heart_beat: float
    check_heart_beat: bool
    suspended: bool = False  # an API server saw it time out; cleared by its next heartbeat


class Controller:
    """Registry of workers keyed by address, with heartbeat expiry and dispatch.

    ``clock`` returns monotonic seconds and ``rng`` drives tie-breaking and lottery draws; both are injectable
    so tests are deterministic. Not thread-safe: the app calls it only from its event loop.
    """

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heart_beat_expiration_s: float = 45.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch_method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        if heart_beat_expiration_s <= 0:
            raise ValueError(f"heart_beat_expiration_s must be positive, got {heart_beat_expiration_s!r}")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration_s = heart_beat_expiration_s
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self._workers: dict[str, _WorkerRecord] = {}
        self.prefixes = PrefixIndex()  # cache_aware: where each fingerprinted prefix was last sent

    @classmethod
    def from_config(
        cls,
        config: ServeConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> Controller:
        return cls(config.dispatch_method, config.heart_beat_expiration_s, clock=clock, rng=rng)

    # ---- registry -------------------------------------------------------------------------------------------

    def register(self, worker_address: str, status: WorkerStatus, check_heart_beat: bool = True) -> None:
        """Add a worker, or replace what is known about it (a worker re-registers after a restart)."""
        address = _normalize(worker_address)
        known = address in self._workers
        self._workers[address] = _WorkerRecord(
            status=status.model_copy(deep=True),
            last_heart_beat=self.clock(),
            check_heart_beat=check_heart_beat,
        )
        logger.info(
            "%s worker %s: models=%s speed=%s queue_length=%d",
            "re-registered" if known else "registered",
            address,
            status.model_names,
            status.speed,
            status.queue_length,
        )

    def heart_beat(self, worker_address: str, queue_length: int, ready: bool = True) -> bool:
        """Record a heartbeat; False when the worker is unknown (it must register again)."""
        record = self._workers.get(_normalize(worker_address))
        if record is None:
            return False
        record.status.queue_length = queue_length
        if ready != record.status.ready:
            logger.info(
                "worker %s is %s",
                _normalize(worker_address),
                "ready again" if ready else "not ready: skipped",
            )
            record.status.ready = ready
        record.last_heart_beat = self.clock()
        if record.suspended:
            logger.info("worker %s heartbeats again; dispatching to it", _normalize(worker_address))
            record.suspended = False
        return True

    def suspend(self, worker_address: str, reason: str = "") -> bool:
        """Skip a worker in dispatch until its next heartbeat or status poll; False when it is unknown."""
        record = self._workers.get(_normalize(worker_address))
        if record is None:
            return False
        if not record.suspended:
            logger.warning(
                "worker %s reported unresponsive (%s); skipped until it heartbeats", worker_address, reason
            )
        record.suspended = True
        return True

    def update_status(self, worker_address: str, status: WorkerStatus) -> bool:
        """Replace a known worker's status (it answered a poll, so it also counts as a heartbeat)."""
        record = self._workers.get(_normalize(worker_address))
        if record is None:
            return False
        record.status = status.model_copy(deep=True)
        record.last_heart_beat = self.clock()
        record.suspended = False
        return True

    def remove(self, worker_address: str) -> bool:
        """Forget a worker; False when it was not registered."""
        removed = self._workers.pop(_normalize(worker_address), None) is not None
        if removed:
            self.prefixes.forget(_normalize(worker_address))
            logger.info("removed worker %s", _normalize(worker_address))
        return removed

    def expire(self, now: float | None = None) -> list[str]:
        """Drop every heartbeat-checked worker silent for longer than the expiration; returns their addresses."""
        now = self.clock() if now is None else now
        expired = [address for address, record in self._workers.items() if not self._is_live(record, now)]
        for address in expired:
            del self._workers[address]
            self.prefixes.forget(address)
            logger.info("expired worker %s (no heartbeat for %.1f s)", address, self.heart_beat_expiration_s)
        return expired

    def _is_live(self, record: _WorkerRecord, now: float) -> bool:
        return not record.check_heart_beat or now - record.last_heart_beat <= self.heart_beat_expiration_s

    def _live_workers(self) -> dict[str, _WorkerRecord]:
        # Stale workers are hidden even before expire() runs, so nothing is dispatched to a worker past its
        # deadline just because the background sweep has not come round yet.
        # A worker whose engine is down (restarting) stays registered but is not live for dispatch.
        now = self.clock()
        return {
            address: rec
            for address, rec in self._workers.items()
            if self._is_live(rec, now) and rec.status.ready
        }

    # ---- queries --------------------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Sorted union of the models the live workers serve."""
        return sorted({name for rec in self._live_workers().values() for name in rec.status.model_names})

    def context_lengths(self) -> dict[str, int]:
        """Each model's longest context (prompt + completion) among the live workers that serve it."""
        lengths: dict[str, int] = {}
        for rec in self._live_workers().values():
            for name in rec.status.model_names:
                lengths[name] = max(lengths.get(name, 0), rec.status.context_length)
        return lengths

    def embedding_details(self) -> dict[str, EmbeddingDetails]:
        """What each model's embeddings are, as a live worker that serves it reports (the same checkpoint
        behind one name gives the same answer on every worker)."""
        details: dict[str, EmbeddingDetails] = {}
        for rec in self._live_workers().values():
            for name in rec.status.model_names:
                if rec.status.embedding is not None:
                    details.setdefault(name, rec.status.embedding)
        return details

    def lora_parents(self) -> dict[str, str]:
        """Each LoRA adapter a live worker serves -> the model it adapts."""
        return {
            name: parent
            for rec in self._live_workers().values()
            for name, parent in rec.status.lora_parents.items()
        }

    def list_workers(self) -> list[WorkerInfo]:
        """Every registered worker, stale ones included (they show their last heartbeat), sorted by address."""
        return [
            WorkerInfo(
                worker_address=address,
                status=rec.status.model_copy(deep=True),
                last_heart_beat=rec.last_heart_beat,
                check_heart_beat=rec.check_heart_beat,
            )
            for address, rec in sorted(self._workers.items())
        ]

    def worker_addresses(self) -> list[str]:
        return sorted(self._workers)

    def status(self) -> ControllerStatus:
        """The live workers taken together."""
        live = self._live_workers().values()
        return ControllerStatus(
            model_names=self.list_models(),
            num_workers=len(live),
            speed=sum(rec.status.speed for rec in live),
            queue_length=sum(rec.status.queue_length for rec in live),
        )

    # ---- dispatch -------------------------------------------------------------------------------------------

    def get_worker_address(
        self,
        model: str,
        exclude: Iterable[str] = (),
        fingerprint: list[int] | None = None,
        dispatch: bool = True,
    ) -> str:
        """A live worker serving ``model`` and not in ``exclude``; "" when there is none. ``fingerprint`` (the
        prompt's, see ``prefix_routing``) steers ``cache_aware`` dispatch. ``dispatch=False`` only asks who
        serves the model (a front end fetching its tokenizer): the first such worker, nothing counted."""
        excluded = {_normalize(address) for address in exclude}
        candidates = [
            (address, rec)
            for address, rec in sorted(self._live_workers().items())
            if model in rec.status.model_names and address not in excluded and not rec.suspended
        ]
        if not candidates:
            return ""
        if not dispatch:
            return candidates[0][0]
        if self.dispatch_method == "lottery":
            return self._pick_lottery(candidates)
        if self.dispatch_method == "cache_aware" and fingerprint:
            address = self._pick_cache_aware(candidates, fingerprint)
            self.prefixes.record(fingerprint, address)
            return address
        return self._pick_shortest_queue(candidates)

    def _pick_cache_aware(self, candidates: list[tuple[str, _WorkerRecord]], fingerprint: list[int]) -> str:
        depth = self.prefixes.matched_chunks(fingerprint)
        least = min(_load(rec.status) for _, rec in candidates)
        warm = [
            (depth[address], -_load(rec.status), address, rec)
            for address, rec in candidates
            if depth.get(address, 0) > 0 and _load(rec.status) <= least + CACHE_AWARE_MAX_IMBALANCE
        ]
        if not warm:
            return self._pick_shortest_queue(candidates)
        _, _, address, record = max(warm, key=lambda item: item[:3])
        record.status.queue_length += 1
        return address

    def _pick_shortest_queue(self, candidates: list[tuple[str, _WorkerRecord]]) -> str:
        loads = [_load(rec.status) for _, rec in candidates]
        best = min(loads)
        # Random tie-breaking: with equal queues a fixed order would send every first request to one worker.
        tied = [i for i, load in enumerate(loads) if load == best or math.isclose(load, best)]
        address, record = candidates[self.rng.choice(tied)]
        # Count the request now; otherwise every request until the next heartbeat would go to the same worker.
        record.status.queue_length += 1
        return address

    def _pick_lottery(self, candidates: list[tuple[str, _WorkerRecord]]) -> str:
        weights = [max(rec.status.speed, 0.0) for _, rec in candidates]
        if sum(weights) <= 0:  # nobody claims any speed: draw uniformly rather than fail
            weights = [1.0] * len(candidates)
        return self.rng.choices([address for address, _ in candidates], weights=weights)[0]


def _load(status: WorkerStatus) -> float:
    # A worker reporting no speed can still serve, but only once every faster worker is busier than infinity.
    return status.queue_length / status.speed if status.speed > 0 else math.inf
