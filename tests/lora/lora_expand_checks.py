"""Checks of the CUDA LoRA expand kernel against the one-hot formula it replaces: on CUDA, or on the CPU under
TRITON_INTERPRET=1 (test_lora_slots.py runs it there)."""

from __future__ import annotations

import torch

from longserve.lora.expand_triton import lora_expand


def reference(y, t, slots, b, num_slots, rank):
    """y + (t masked by a one-hot of each row's slot) @ b, in float64."""
    rows = y.shape[0]
    shards = t.shape[1] // (num_slots * rank)
    onehot = torch.zeros(rows, num_slots, dtype=torch.float64)
    for row, slot in enumerate(slots[:rows].tolist()):
        if slot >= 0:
            onehot[row, slot] = 1
    kept = t.double().view(rows, shards, num_slots, rank) * onehot.view(rows, 1, num_slots, 1)
    return y.double() + kept.view(rows, -1) @ b.double()


def check_all(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    # (rows, num_slots, rank, shards, out): decode sizes, a prefill size over several row tiles, ranks and
    # widths that do not fill a tile, one shard and three (q|k|v)
    for rows, num_slots, rank, shards, out in [(1, 2, 8, 1, 40), (13, 3, 4, 3, 72), (70, 4, 16, 2, 130)]:
        width = shards * num_slots * rank
        t = torch.randn(rows, width, generator=g)
        b = torch.randn(width, out, generator=g)
        y = torch.randn(rows, out, generator=g)
        slots = torch.randint(-1, num_slots, (rows + 5,), generator=g, dtype=torch.int32)  # past rows: unread
        want = reference(y, t, slots, b, num_slots, rank)
        got = lora_expand(
            y.to(device), t.to(device), slots.to(device), b.to(device), num_slots, rank
        )  # fp32: exact products
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4)
        base_rows = (slots[:rows] < 0).nonzero().squeeze(1)
        assert torch.equal(got.cpu()[base_rows], y[base_rows])  # a base-model row is left as it was
