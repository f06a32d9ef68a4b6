"""Block manager: owns the paged KV cache's block ids, hands them to sequences and takes every one back."""

from __future__ import annotations

from longserve.engine.sequence import Sequence

PAD_BLOCK = 0  # never handed out: padded gathers read it, so it stays zero


class BlockManager:
    """Fixed-size blocks of ``block_size`` token slots; a sequence's block table maps its positions to them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the pad block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks (memory already committed) are reused first, lowest ids at the start.
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs so that its first ``num_tokens`` positions have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` positions; call ``can_grow`` first."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {needed}, have {self.num_free_blocks}")
        seq.block_table.extend(self._free.pop() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` (finished, aborted or preempted)."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
