"""Adapter slots on every projection LoRA can reach, and which slot each row of a step uses.

Each projection keeps every slot's A and B preallocated (loading an adapter copies into its slot, nothing is
reallocated), so a step mixes rows of any resident adapters and of none. A step's LoRA update is three
matmuls per projection whatever the mix: the rows' products with every slot's A at once, masked to each row's
own slot, then one B for all shards added in place: on CUDA a Triton kernel masks and adds in one launch
(lora/expand_triton.py; each row's slot a static int32 buffer refreshed every step), elsewhere a one-hot
[rows, slots] and ``addmm_``. At decode this reads each resident adapter's weights once per step, as a
gathered (BGMV) kernel does when the resident adapters are in use; its shapes are static, so CUDA graphs
capture it. On the CPU, where FLOPs rather than
bytes bound a step, one compiled call per projection (``lora_add_``) runs each row with its own slot only.
"""

from __future__ import annotations

import torch

from longserve.layers.linear import Linear, ShardTarget
from longserve.lora.adapter import LoRAAdapter, LoRAError


class LoRARows:
    """The current step's slot of each row: int32 [max_rows] on the device for the CUDA kernel, on the host for
    the compiled CPU kernels, else one-hot [max_rows, slots] (-1 / all zeros: the base model)."""

    def __init__(
        self, num_slots: int, max_rows: int, device: torch.device, dtype: torch.dtype, kernels=None
    ) -> None:
        self.num_slots = num_slots
        self.dtype = dtype
        self.kernels = kernels  # the compiled CPU kernels (fp32 on the CPU), which read row_slots
        self.on_cuda = device.type == "cuda"
        slots_device = device if self.on_cuda else torch.device("cpu")
        self.row_slots = torch.full((max_rows,), -1, dtype=torch.int32, device=slots_device)
        self.onehot = (
            None
            if self.on_cuda or kernels is not None
            else torch.zeros(max_rows, num_slots, dtype=dtype, device=device)
        )
        # On the CPU a step without adapter rows skips the update; on CUDA it always runs (graph-safe).
        self.always = device.type == "cuda"
        self.active = self.always

    def set(self, slots: list[int], counts: list[int]) -> None:
        """The next forward's rows: per sequence in step order, its slot (-1: none) and its row count."""
        rows, max_rows = sum(counts), self.row_slots.shape[0]
        if rows > max_rows:
            raise ValueError(f"a step of {rows} rows exceeds the {max_rows} LoRA rows allocated")
        self.active = self.always or any(slot >= 0 for slot in slots)
        if not self.active:
            return
        if self.onehot is None:
            per_row = [slot for slot, count in zip(slots, counts, strict=True) for _ in range(count)]
            host = torch.tensor(per_row + [-1] * (max_rows - rows), dtype=torch.int32)
            self.row_slots.copy_(host, non_blocking=True)  # rows past the step (a graph's padding): none
            return
        host = torch.zeros(self.onehot.shape, dtype=self.onehot.dtype)
        row = 0
        for slot, count in zip(slots, counts, strict=True):
            if slot >= 0:
                host[row : row + count, slot] = 1.0
            row += count
        self.onehot.copy_(host, non_blocking=True)


class LoRALinear:
    """One projection's slots: A of every (shard, slot) stacked [shards * slots * rank, in], and per shard B
    transposed, [slots * rank, shard rows], scaled (a rank's weights for every output contiguous: the CPU
    kernel's update vectorizes over the outputs). A rank below ``max_rank`` is padded with zeros.

    Without the CPU kernels the shards' B are blocks of one [shards * slots * rank, out] matrix, zero outside
    each shard's rows and columns: a fused projection's update is then one matmul, not one per shard (on a GPU
    each small launch costs about as much as its work; the zeros are a few MB a model)."""

    def __init__(self, linear: Linear, rows: LoRARows, max_rank: int) -> None:
        device = rows.row_slots.device if rows.on_cuda else torch.device("cpu")
        dtype = rows.dtype
        self.rows, self.max_rank = rows, max_rank
        self.shard_offsets, self.shard_sizes = linear.shard_offsets, linear.shard_sizes
        self.in_features = linear.in_features
        slots_rank = rows.num_slots * max_rank
        shards = len(self.shard_sizes)
        self.a = torch.zeros(shards * slots_rank, linear.in_features, dtype=dtype, device=device)
        if rows.kernels is None:
            self.b = torch.zeros(shards * slots_rank, sum(self.shard_sizes), dtype=dtype, device=device)
            self.bt = [
                self.b[shard * slots_rank : (shard + 1) * slots_rank, offset : offset + size]
                for shard, (offset, size) in enumerate(zip(self.shard_offsets, self.shard_sizes, strict=True))
            ]
        else:
            self.bt = [torch.zeros(slots_rank, size, dtype=dtype, device=device) for size in self.shard_sizes]

    def write(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put one shard's A [r, in] and scaled B [shard rows, r] into ``slot``."""
        rank, start = a.shape[0], (shard * self.rows.num_slots + slot) * self.max_rank
        self.a[start : start + rank].copy_(a)
        self.bt[shard][slot * self.max_rank : slot * self.max_rank + rank].copy_(b.T)

    def clear(self, slot: int) -> None:
        for shard, bt in enumerate(self.bt):
            start = (shard * self.rows.num_slots + slot) * self.max_rank
            self.a[start : start + self.max_rank].zero_()
            bt[slot * self.max_rank : (slot + 1) * self.max_rank].zero_()

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's own adapter update; x [rows, in], y [rows, out]."""
        if not self.rows.active:
            return y
        if self.rows.kernels is not None:
            self.rows.kernels.lora_add_(
                y, x, self.a, self.bt, self.rows.row_slots, self.rows.num_slots, self.max_rank
            )
            return y
        rows, shards, slots = x.shape[0], len(self.bt), self.rows.num_slots
        t = x.to(self.a.dtype) @ self.a.T  # [rows, shards * slots * rank]
        if self.rows.on_cuda:
            from longserve.lora.expand_triton import lora_expand

            return lora_expand(y, t, self.rows.row_slots, self.b, slots, self.max_rank)
        onehot = self.rows.onehot[:rows].view(rows, 1, slots, 1)
        t = t.view(rows, shards, slots, self.max_rank) * onehot  # each row keeps its own slot's ranks
        return y.addmm_(t.view(rows, -1), self.b)  # [rows, out]: every shard's block at once


class LoRASlots:
    """``num_slots`` adapter slots on every projection of ``targets`` (a model's ``weight_targets()``: the
    ``ShardTarget`` ones are the projections LoRA can reach, by their checkpoint names)."""

    def __init__(
        self,
        targets: dict[str, object],
        num_slots: int,
        max_rank: int,
        max_rows: int,
        device: torch.device,
        dtype: torch.dtype,
        kernels=None,  # the compiled CPU kernels (layers/cpu_kernels.py), for fp32 rows on the CPU
    ) -> None:
        self.max_rank = max_rank
        self.rows = LoRARows(num_slots, max_rows, device, dtype, kernels)
        self.targets: dict[str, tuple[LoRALinear, int]] = {}  # weight name -> (slots, shard)
        for name, target in targets.items():
            if isinstance(target, ShardTarget) and name.endswith(".weight"):
                linear = target.linear
                if linear.lora is None:
                    linear.lora = LoRALinear(linear, self.rows, max_rank)
                self.targets[name] = (linear.lora, target.index)
        if not self.targets:
            raise ValueError("this model has no projections LoRA can reach")

    def check(self, adapter: LoRAAdapter) -> None:
        """``LoRAError`` unless every module of ``adapter`` fits one of the base model's projections."""
        for name, (a, b) in adapter.modules.items():
            found = self.targets.get(name)
            if found is None:
                raise LoRAError(
                    f"LoRA adapter {adapter.name!r} targets {name.removesuffix('.weight')}, which is not a "
                    "projection of this model that LoRA can reach"
                )
            lora, shard = found
            expected_in, expected_out = lora.in_features, lora.shard_sizes[shard]
            if a.shape[1] != expected_in or b.shape[0] != expected_out:
                raise LoRAError(
                    f"LoRA adapter {adapter.name!r} does not fit this base model: "
                    f"{name.removesuffix('.weight')} is [{expected_out}, {expected_in}], the adapter's update "
                    f"is [{b.shape[0]}, {a.shape[1]}]"
                )

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Replace whatever ``slot`` held by ``adapter`` (checked first)."""
        self.check(adapter)
        self.clear(slot)
        for name, (a, b) in adapter.modules.items():
            lora, shard = self.targets[name]
            lora.write(slot, shard, a, b)

    def clear(self, slot: int) -> None:
        for lora in {id(lora): lora for lora, _ in self.targets.values()}.values():
            lora.clear(slot)
