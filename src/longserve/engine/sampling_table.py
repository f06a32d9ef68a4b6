"""Each sampling sequence's parameters as one row of a table (vLLM's persistent batch idea): written once,
when the sequence first samples, and freed when it ends. On the CPU a step gathers its rows with one numpy
index; on a GPU the table has a device mirror, written only where rows changed, that the sampling kernel
reads by row index, so a step uploads its rows' indices and nothing per parameter."""

from __future__ import annotations

import math

import numpy as np
import torch

from longserve.engine.sampling_ops import RowParams
from longserve.engine.sequence import Sequence
from longserve.engine.uploads import StepUploader, as_floats

# Columns of the float64 table (top_k is an integer below 2^53, exact in a float64).
TEMPERATURE, TOP_K, TOP_P, MIN_P, GREEDY, SEEDED = range(6)


class SamplingTable:
    """Rows of temperature, top-k, top-p, min-p and the greedy and seeded flags; greedy rows hold the neutral
    values (1.0, vocab, 1.0, 0.0), so a batch of mixed rows samples every row the same way."""

    def __init__(self, vocab: int, capacity: int = 256) -> None:
        self.vocab = vocab
        self.values = np.zeros((capacity, 6))  # [rows, columns]
        self._free = list(range(capacity - 1, -1, -1))
        self._rows: dict[Sequence, int] = {}  # (the rows' owners: release finds a row by its sequence)
        self._mirror: torch.Tensor | None = None  # [rows, columns] float64 on the device, once asked for
        self._unsynced: list[int] = []  # rows written since the mirror last took them

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, seqs: list[Sequence]) -> np.ndarray:
        """The rows of ``seqs`` (written for any seen for the first time), in order: ``[len(seqs)]`` int64."""
        rows = self._rows
        index = [rows.get(seq, -1) for seq in seqs]
        if -1 in index:
            index = [row if row >= 0 else self._write(seq) for seq, row in zip(seqs, index, strict=True)]
        return np.asarray(index, dtype=np.int64)

    def mirror(self, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """The device mirror, and the rows written since the last call (the caller copies them in, on the
        stream, behind the kernels that read the old values). A new or grown mirror is copied whole."""
        if self._mirror is None or self._mirror.shape[0] != len(self.values):
            self._mirror = torch.from_numpy(self.values).to(device)
            self._unsynced = []
        unsynced, self._unsynced = self._unsynced, []
        return self._mirror, unsynced

    def release(self, seq: Sequence) -> None:
        row = self._rows.pop(seq, None)
        if row is not None:
            self._free.append(row)

    def _write(self, seq: Sequence) -> int:
        row = self._rows.get(seq)  # (a sequence met twice in one step: verification rows)
        if row is not None:
            return row
        if not self._free:
            grown = len(self.values)
            self.values = np.concatenate([self.values, np.zeros_like(self.values)])
            self._free = list(range(2 * grown - 1, grown - 1, -1))
        row = self._rows[seq] = self._free.pop()
        p = seq.params
        if p.greedy:
            self.values[row] = (1.0, self.vocab, 1.0, 0.0, 1.0, 0.0)
        else:
            top_k = p.top_k if 0 < p.top_k < self.vocab else self.vocab
            self.values[row] = (p.temperature, top_k, p.top_p, p.min_p, 0.0, seq.generator is not None)
        if self._mirror is not None:
            self._unsynced.append(row)
        return row


def draw_uniforms(values: np.ndarray, seqs: list[Sequence]) -> np.ndarray:
    """``[n]`` float64 for rows ``values`` ``[n, columns]`` of ``seqs``: a seeded row's uniform from its own
    generator (so it reproduces whatever else is in the batch; a CPU generator, drawn on the host), NaN for
    the others (drawn on the device)."""
    uniform = np.full(len(seqs), math.nan)
    for row in np.flatnonzero(values[:, SEEDED]).tolist():
        uniform[row] = torch.rand(1, dtype=torch.float64, generator=seqs[row].generator).item()
    return uniform


def rows_as_params(values: np.ndarray, uniform: np.ndarray, uploader: StepUploader) -> RowParams:
    """The torch ops' view of table rows ``values`` ``[n, columns]``, uploaded in one copy."""
    greedy, top_k, top_p, min_p = (values[:, GREEDY] != 0, values[:, TOP_K].astype(np.int64),
                                   values[:, TOP_P], values[:, MIN_P])  # fmt: skip
    parts = uploader.upload(
        [[values[:, TEMPERATURE].view(np.int64)], [top_k], [top_p.view(np.int64)], [min_p.view(np.int64)],
         [uniform.view(np.int64)], [greedy]]
    )  # fmt: skip
    return RowParams(
        temperature=as_floats(parts[0]),
        top_k=parts[1],
        top_p=as_floats(parts[2]),
        min_p=as_floats(parts[3]),
        uniform=parts[4].view(torch.float64),
        greedy=parts[5].bool(),
        host_top_k=top_k.tolist(),
        host_top_p=top_p.tolist(),
        any_min_p=bool((min_p > 0.0).any()),
        any_seeded=bool(values[:, SEEDED].any()),
        any_greedy=bool(greedy.any()),
    )
