"""One projection's LoRA slots: the compiled CPU update and the masked torch update both give each row exactly
its own adapter's B A x, for fused projections (q|k|v) with ranks below the slot rank; CUDA's expand kernel
gives the masked update's sums (under Triton's interpreter here, on a GPU in the gpu run)."""

from pathlib import Path

import lora_expand_checks
import pytest
import torch
import triton_interpreter

from longserve.layers.linear import Linear
from longserve.lora.slots import LoRALinear, LoRARows


def _kernels():
    from longserve.layers.cpu_kernels import cpu_kernels

    try:
        return cpu_kernels()
    except RuntimeError as exc:
        pytest.skip(f"no CPU kernels here: {exc}")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("shard_sizes", [[40], [48, 16, 16]])
def test_each_row_gets_its_own_adapter(compiled, shard_sizes):
    torch.manual_seed(0)
    num_slots, max_rank, in_features = 3, 8, 37
    linear = Linear(in_features, shard_sizes, False, torch.float32)
    rows = LoRARows(num_slots, 16, torch.device("cpu"), torch.float32, _kernels() if compiled else None)
    lora = LoRALinear(linear, rows, max_rank)
    updates = {}  # (slot, shard) -> (A, B)
    for slot in range(num_slots):
        for shard, size in enumerate(shard_sizes):
            rank = [8, 3, 5][slot]
            a, b = torch.randn(rank, in_features), torch.randn(size, rank)
            lora.write(slot, shard, a, b)
            updates[slot, shard] = a, b
    lora.clear(1)  # an emptied slot adds nothing
    row_slots, counts = [2, -1, 0, 1, 2], [1, 2, 3, 1, 2]
    rows.set(row_slots, counts)
    x = torch.randn(sum(counts), in_features)
    y = torch.randn(sum(counts), sum(shard_sizes))
    expected = y.clone()
    per_row = [slot for slot, count in zip(row_slots, counts, strict=True) for _ in range(count)]
    for r, slot in enumerate(per_row):
        if slot in (-1, 1):
            continue
        offset = 0
        for shard, size in enumerate(shard_sizes):
            a, b = updates[slot, shard]
            expected[r, offset : offset + size] += b @ (a @ x[r])
            offset += size
    torch.testing.assert_close(lora.add_delta(x, y.clone()), expected, rtol=1e-5, atol=1e-5)
    rows.set([-1], [sum(counts)])  # no adapter rows: nothing changes
    assert torch.equal(lora.add_delta(x, y.clone()), y)


def test_expand_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    triton_interpreter.run_checks(
        "import lora_expand_checks; lora_expand_checks.check_all('cpu')", Path(__file__).resolve().parent
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expand_kernel_on_cuda():
    lora_expand_checks.check_all("cuda")
