"""``TensorParallel``: one rank's place in its tensor-parallel group, how it slices the checkpoint's tensors, and
the collectives its model calls (Megatron-style: column-parallel in, row-parallel out, one all-reduce each).

With ``size == 1`` every collective is the identity and every slice the whole tensor, so a single-device model
runs the same code at the cost of a branch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


class TensorParallel:
    """Rank ``rank`` of ``size``. ``group`` carries tensors (NCCL on CUDA, gloo on CPU); ``control`` is a gloo
    group for the step descriptions rank 0 sends the others (pickled objects, on the host)."""

    def __init__(
        self,
        rank: int = 0,
        size: int = 1,
        group: Any = None,
        control: Any = None,
        *,
        expert_parallel: bool = False,  # MoE: experts split across ranks instead of each expert's rows
    ) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a group of {size}")
        self.rank, self.size = rank, size
        self.group, self.control = group, control
        self.expert_parallel = expert_parallel and size > 1

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size}, expert_parallel={self.expert_parallel})"

    # ---- sizes --------------------------------------------------------------------------------------------

    def local(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (heads, rows, experts); ``what`` names it in the error."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({self.size})")
        return total // self.size

    def local_kv_heads(self, total: int) -> int:
        """KV heads this rank keeps: its share, or one replicated head when there are fewer heads than ranks."""
        if total >= self.size:
            return self.local(total, "num_key_value_heads")
        if self.size % total:
            raise ValueError(
                f"num_key_value_heads ({total}) must divide the tensor-parallel size ({self.size}) "
                "to be replicated across ranks"
            )
        return 1

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """[start, stop) of the vocabulary rows this rank holds; every rank holds ceil(vocab / size) rows, the
        last one's tail is padding (zero rows, logits cut off after the gather)."""
        per_rank = -(-vocab // self.size)
        start = self.rank * per_rank
        return start, min(start + per_rank, vocab)

    def local_vocab(self, vocab: int) -> int:
        return -(-vocab // self.size)

    # ---- slicing the checkpoint's full tensors ------------------------------------------------------------

    def rows(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's equal part of ``tensor`` along ``dim`` (column-parallel rows; ``dim=1``: row-parallel
        input columns)."""
        if not self.is_parallel:
            return tensor
        part = self.local(tensor.shape[dim], f"dimension {dim} of a {tuple(tensor.shape)} tensor")
        return tensor.narrow(dim, self.rank * part, part)

    def kv_head_rows(self, tensor: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """The rows (``[heads * head_dim, ...]``) of this rank's KV heads; with fewer heads than ranks, the one
        head this rank's query heads read (ranks ``r * heads // size`` share it)."""
        if not self.is_parallel:
            return tensor
        if num_kv_heads >= self.size:
            return self.rows(tensor)
        self.local_kv_heads(num_kv_heads)  # the divisibility check
        head_dim = tensor.shape[0] // num_kv_heads
        head = self.rank * num_kv_heads // self.size
        return tensor.narrow(0, head * head_dim, head_dim)

    def vocab_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary rows of an embedding or output head, zero-padded to ``local_vocab`` rows."""
        if not self.is_parallel:
            return tensor
        start, stop = self.vocab_range(tensor.shape[0])
        part = tensor[start:stop]
        pad = self.local_vocab(tensor.shape[0]) - part.shape[0]
        return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part

    def embedding(self, input_ids: torch.Tensor, table: torch.Tensor, vocab: int) -> torch.Tensor:
        """Vocab-parallel lookup: each rank fills the rows of the ids it holds, zeros elsewhere, then the sum.

        ``input_ids`` [tokens]; ``table`` [local_vocab, hidden] -> [tokens, hidden] on every rank."""
        if not self.is_parallel:
            return F.embedding(input_ids, table)
        start, _ = self.vocab_range(vocab)
        local_ids = input_ids - start
        outside = (local_ids < 0) | (local_ids >= table.shape[0])  # [tokens]
        hidden = F.embedding(local_ids.masked_fill(outside, 0), table)
        return self.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))

    def gather_logits(self, local_logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """[rows, local_vocab] from each rank -> [rows, vocab] on every rank (the padding rows dropped)."""
        if not self.is_parallel:
            return local_logits
        return self.all_gather(local_logits, dim=-1)[:, :vocab]

    def on_first_rank(self, tensor: torch.Tensor) -> torch.Tensor:
        """A row-parallel bias: added once, so rank 0 holds it and the others hold zeros."""
        return tensor if self.rank == 0 else torch.zeros_like(tensor)

    # ---- collectives --------------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial ``x`` (in place), on every rank."""
        if self.is_parallel:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order, on every rank."""
        if not self.is_parallel:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank (pickled, over the control group)."""
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled, over the host's control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]
