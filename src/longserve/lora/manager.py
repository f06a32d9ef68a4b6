"""Which adapters the engine knows, which are in host memory, and which sit in the device slots.

Adapters are registered by name (``--lora-modules``, or loaded at run time) and read at once, so a bad one
is refused before any request names it. Up to ``max_cpu_loras`` stay in host memory (least recently used
first out; one evicted is read again from its directory when a request next names it), more while queued
or running sequences hold them; ``max_loras`` sit in the projections' slots. A running sequence pins its
adapter's slot; a waiting one whose adapter has no slot waits until one is free of running sequences. Every registration gets a new id: the prefix cache keys KV
blocks by it, so two adapters (or one reloaded with new weights) never share KV.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from longserve.engine.sequence import Sequence
from longserve.lora.adapter import LoRAAdapter, LoRAError, read_adapter
from longserve.lora.slots import LoRASlots

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    lora_id: int = 0  # 0: empty
    users: int = 0  # running sequences that use it
    last_used: int = 0  # the manager's clock when it was last acquired


class LoRAManager:
    def __init__(self, slots: LoRASlots, num_slots: int, max_cpu_loras: int) -> None:
        if max_cpu_loras < num_slots:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({num_slots})")
        self.slots = slots
        self.max_cpu_loras = max_cpu_loras
        self.paths: dict[str, str] = {}  # registered name -> directory
        self.ids: dict[str, int] = {}  # registered name -> its id (new on every registration)
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # id -> adapter, least recently used first
        self.held: dict[int, int] = {}  # id -> unfinished sequences that use it (their adapter stays in host)
        self.device_slots = [_Slot() for _ in range(num_slots)]
        self._next_id = 1
        self._clock = 0

    @property
    def names(self) -> list[str]:
        return sorted(self.paths)

    def add(self, name: str, path: str) -> None:
        """Register ``name``: read and check the adapter now (``LoRAError`` if it cannot be served; a name
        already registered is an error too)."""
        if name in self.paths:
            raise LoRAError(f"LoRA adapter {name!r} is already loaded")
        adapter = read_adapter(name, path, self.slots.max_rank)
        self.slots.check(adapter)
        lora_id, self._next_id = self._next_id, self._next_id + 1
        self.paths[name], self.ids[name] = str(path), lora_id
        self._keep(lora_id, adapter)
        log.info("LoRA adapter %r loaded from %s: rank %d, %d projections", name, path, adapter.rank,
                 len(adapter.modules))  # fmt: skip

    def remove(self, name: str) -> None:
        """Unregister ``name``: new requests may no longer use it; sequences running on it finish on it
        (its slot is freed when the last one ends)."""
        if name not in self.paths:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded")
        del self.paths[name]
        lora_id = self.ids.pop(name)
        if lora_id not in self.held:
            self.host.pop(lora_id, None)
        for index, slot in enumerate(self.device_slots):
            if slot.lora_id == lora_id and slot.users == 0:
                self._empty(index)

    def stats(self, running: Iterable[Sequence], waiting: Iterable[Sequence]) -> dict:
        """``EngineStats``' LoRA fields: the adapters of running and of waiting sequences, and the slots."""
        names = {lora_id: name for name, lora_id in self.ids.items()}

        def adapters(seqs: Iterable[Sequence]) -> list[str]:
            return sorted({names.get(s.lora_id, f"unloaded-{s.lora_id}") for s in seqs if s.lora_id})

        return {
            "running_loras": adapters(running),
            "waiting_loras": adapters(waiting),
            "max_loras": len(self.device_slots),
        }

    def hold(self, name: str) -> int:
        """For a new sequence: the id of registered adapter ``name``, read again if it left host memory;
        ``LoRAError`` if it is unknown or no longer readable. Every ``hold`` is paired with an ``unhold``."""
        lora_id = self.ids.get(name)
        if lora_id is None:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded")
        if lora_id not in self.host:
            self._keep(lora_id, read_adapter(name, self.paths[name], self.slots.max_rank))
        self.host.move_to_end(lora_id)
        self.held[lora_id] = self.held.get(lora_id, 0) + 1
        return lora_id

    def unhold(self, lora_id: int) -> None:
        """A sequence that held ``lora_id`` finished."""
        self.held[lora_id] -= 1
        if self.held[lora_id] == 0:
            del self.held[lora_id]
            if lora_id not in self.ids.values():
                self.host.pop(lora_id, None)  # unregistered meanwhile
            self._keep_within_limit()

    def acquire(self, seq: Sequence) -> bool:
        """Give ``seq`` a slot holding its adapter (loading it into a free slot if needed); False if every
        slot is in use by running sequences of other adapters."""
        self._clock += 1
        index = next((i for i, s in enumerate(self.device_slots) if s.lora_id == seq.lora_id), None)
        if index is None:
            free = [i for i, s in enumerate(self.device_slots) if s.users == 0]
            if not free:
                return False
            index = min(free, key=lambda i: self.device_slots[i].last_used)
            self.slots.write(index, self._adapter(seq.lora_id))
            self.device_slots[index].lora_id = seq.lora_id
        slot = self.device_slots[index]
        slot.users += 1
        slot.last_used = self._clock
        seq.lora_slot = index
        return True

    def release(self, seq: Sequence) -> None:
        """``seq`` no longer runs (finished or preempted): it stops pinning its slot."""
        if seq.lora_slot < 0:
            return
        slot = self.device_slots[seq.lora_slot]
        slot.users -= 1
        if slot.users == 0 and slot.lora_id not in self.ids.values():
            self._empty(seq.lora_slot)  # unregistered meanwhile
        seq.lora_slot = -1

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.host[lora_id]  # held by the sequence asking: still in host memory
        self.host.move_to_end(lora_id)
        return adapter

    def _keep(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.host[lora_id] = adapter
        self._keep_within_limit()

    def _keep_within_limit(self) -> None:
        spare = [i for i in self.host if i not in self.held]  # least recently used first
        for lora_id in spare[: max(0, len(self.host) - self.max_cpu_loras)]:
            del self.host[lora_id]

    def _empty(self, index: int) -> None:
        self.slots.clear(index)
        self.device_slots[index] = _Slot()
