"""Host-to-device staging: a step's host ints (and floats) reach the device in one non-blocking copy.

On a GPU host every small torch op costs microseconds, and ``torch.tensor(list, device="cuda")`` waits for
the stream to drain, which would stall an overlapped step. So host values are written straight into a pinned
buffer through its numpy view and copied in one transfer; each part comes back as a view into one device
buffer. On the CPU the parts are views into one fresh tensor (no copy at all).
"""

from __future__ import annotations

import numpy as np
import torch

Segment = list[int] | np.ndarray | torch.Tensor  # a run of int64 values: host ints, numpy or a 1-D CPU tensor


def float_bits(values: list[float]) -> np.ndarray:
    """``values`` as float64 bit patterns in int64, to ride in an upload; ``as_floats`` reads them back."""
    return np.asarray(values, dtype=np.float64).view(np.int64)


def as_floats(uploaded: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The floats an upload of ``float_bits`` carried, as ``dtype``."""
    return uploaded.view(torch.float64).to(dtype)


class StepUploader:
    """Copies a step's host values to the device in one transfer, through pinned buffers used in turn.

    ``depth`` host buffers are used in turn, so filling one waits only for the copy out of it ``depth``
    uploads ago (an event, not a device sync): an overlapped engine uploads step N+1 while step N still runs.
    A device buffer is refilled by a copy queued behind the kernels that read it, on the same stream.
    """

    def __init__(self, device: torch.device, depth: int = 2) -> None:
        self.device = device
        self._turns = [_Staging() for _ in range(depth)] if device.type == "cuda" else []
        self._turn = 0

    def upload(self, parts: list[list[Segment]]) -> list[torch.Tensor]:
        """One int64 tensor on the device per part (its segments concatenated), from a single copy."""
        total = sum(_length(segment) for part in parts for segment in part)
        if not self._turns:
            flat = torch.empty(total, dtype=torch.long)
            return _fill(flat, flat.numpy(), parts)
        staging = self._turns[self._turn]
        self._turn = (self._turn + 1) % len(self._turns)
        if staging.copied is not None:
            staging.copied.synchronize()
        if total > staging.host.numel():
            capacity = max(total, 2 * staging.host.numel(), 4096)
            staging.host = torch.empty(capacity, dtype=torch.long, pin_memory=True)
            staging.device = torch.empty(capacity, dtype=torch.long, device=self.device)
        _fill(staging.host, staging.host.numpy(), parts)
        staging.device[:total].copy_(staging.host[:total], non_blocking=True)
        staging.copied = torch.cuda.Event()
        staging.copied.record()
        return _views(staging.device, parts)


class _Staging:
    def __init__(self) -> None:
        self.host = torch.empty(0, dtype=torch.long)
        self.device: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None


def _fill(host: torch.Tensor, array: np.ndarray, parts: list[list[Segment]]) -> list[torch.Tensor]:
    offset = 0
    for part in parts:
        for segment in part:
            n = _length(segment)
            if isinstance(segment, torch.Tensor):
                host[offset : offset + n].copy_(segment.reshape(-1))
            else:
                array[offset : offset + n] = segment
            offset += n
    return _views(host, parts)


def _views(flat: torch.Tensor, parts: list[list[Segment]]) -> list[torch.Tensor]:
    views, offset = [], 0
    for part in parts:
        n = sum(_length(segment) for segment in part)
        views.append(flat[offset : offset + n])
        offset += n
    return views


def _length(segment: Segment) -> int:
    return segment.numel() if isinstance(segment, torch.Tensor) else len(segment)
