"""Paged KV cache storage: one key and one value tensor per layer, indexed by flat cache slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.layers.triton_support import use_triton


@dataclass
class LayerKVCache:
    """A layer's keys and values; slot = block_id * block_size + offset in block."""

    key: torch.Tensor  # [num_blocks * block_size, kv_heads, head_dim]
    value: torch.Tensor  # [num_blocks * block_size, kv_heads, head_dim]
    # MoBA on CUDA: [num_blocks, kv_heads, head_dim] float32, the mean key of each complete MoBA block,
    # stored at the cache block holding the MoBA block's first token (so decode never re-reads old keys)
    gate_keys: torch.Tensor | None = None

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store this step's new keys/values ([tokens, kv_heads, head_dim]) at their slots."""
        if use_triton(key) and key.stride(-1) == 1 and value.stride(-1) == 1 and key.shape[0]:
            from longserve.attention.paged_triton import store_kv_kernel

            tokens, heads, dim = key.shape
            store_kv_kernel[(tokens,)](
                key, value, self.key, self.value, slot_mapping,
                key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                self.key.stride(0), self.key.stride(1), self.value.stride(0), self.value.stride(1),
                heads, dim, HEADS_PAD=_pow2(heads), DIM_PAD=_pow2(dim), num_warps=4,
            )  # fmt: skip
            return
        self.key.index_copy_(0, slot_mapping, key.to(self.key.dtype))
        self.value.index_copy_(0, slot_mapping, value.to(self.value.dtype))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (any shape) as ``dtype``: [*slots.shape, kv_heads, head_dim] each."""
        flat, shape = slots.reshape(-1), (*slots.shape, *self.key.shape[1:])
        return (
            self.key.index_select(0, flat).view(shape).to(dtype),
            self.value.index_select(0, flat).view(shape).to(dtype),
        )

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """This step's keys or values as a later step will read them back (rounded to a narrower cache
        dtype), so a prompt attends the same whether its prefix was cached or computed in this step."""
        return x if x.dtype == self.key.dtype else x.to(self.key.dtype).to(x.dtype)


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    gate_keys: bool = False,  # also keep MoBA's per-block mean keys
) -> list[LayerKVCache]:
    """Cache for every layer, as views of one allocation, zeroed.

    Zeroing commits the whole pool now: left untouched, the OS would map it lazily and the process's memory
    would climb by up to the pool's size as blocks are first used, which a dashboard cannot tell from a leak
    and which fails late on a box without the memory. Block 0 (the pad block) must be zero anyway: padded
    gathers read it, and garbage there (NaN) would leak through a masked softmax.
    """
    storage = torch.zeros(
        2, num_layers, num_blocks * block_size, kv_heads, head_dim, dtype=dtype, device=device
    )
    gates = (
        torch.zeros(num_layers, num_blocks, kv_heads, head_dim, dtype=torch.float32, device=device)
        if gate_keys
        else None
    )
    return [
        LayerKVCache(storage[0, layer], storage[1, layer], None if gates is None else gates[layer])
        for layer in range(num_layers)
    ]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
