"""Block manager: owns the paged KV cache's block ids, hands them to sequences and takes every one back, and
keeps full blocks cached by their contents (prefix caching) until their memory is needed.

A full block is keyed by its token ids chained onto its predecessor's key, so equal keys mean an equal prefix
up to and including that block: its KV is the same and another sequence may read it instead of recomputing.
Blocks are reference-counted; a cached block whose last holder ends stays cached (evictable), and when no
never-cached block is free, the least recently released cached block is taken back first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from longserve.engine.sequence import Sequence

PAD_BLOCK = 0  # never handed out: padded gathers read it, so it stays zero

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key, or the salt; this block's tokens)


class BlockManager:
    """Fixed-size blocks of ``block_size`` token slots; a sequence's block table maps its positions to them.

    With ``enable_prefix_caching``, ``match_prefix`` finds the cached blocks a new sequence may start from, in
    whole groups of ``match_granularity`` blocks (MoBA keeps one mean key per MoBA block, so it shares only
    whole MoBA blocks); ``cache_computed`` registers a sequence's blocks as they fill.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = False,
        match_granularity: int = 1,
        salt: int = 0,  # mixed into the first block's key: anything else that changes the KV
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the pad block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.match_granularity = max(1, match_granularity)
        self.salt = salt
        # A stack: recently freed blocks (memory already committed) are reused first, lowest ids at the start.
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}  # cached blocks
        self._block_of: dict[BlockKey, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recent first
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of those, found cached
        self.tables = BlockTableArray()  # every holder's table as an array row, for the runner's steps

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence may be given now: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by sequences (0..1); cached blocks nobody holds count as free."""
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
        first = len(seq.block_table)
        for _ in range(needed):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            seq.block_table.append(block)
        if needed:
            self.tables.write(seq, first)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks past the first ``num_tokens`` positions (rejected drafts' KV)."""
        keep = -(-num_tokens // self.block_size)
        if keep >= len(seq.block_table):
            return
        for block in reversed(seq.block_table[keep:]):
            self._release(block)
        del seq.block_table[keep:]
        self.tables.cut(seq, keep)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finished, aborted or preempted); cached ones stay cached.

        The tail is released first, so under pressure a sequence's last blocks are evicted before its first
        ones (a shorter shared prefix stays useful; a longer one without its start is not).
        """
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.block_keys = []
        self.tables.release(seq)

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # ---- prefix caching -------------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of ``seq``'s tokens, in whole groups; the last token is
        never covered (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.token_ids()
        full = (len(tokens) - 1) // self.block_size
        blocks: list[int] = []
        parent = self._root(seq)
        for index in range(full):
            key = (parent, tuple(tokens[index * self.block_size : (index + 1) * self.block_size]))
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            parent = hash(key)
        return blocks[: len(blocks) // self.match_granularity * self.match_granularity]

    def _root(self, seq: Sequence) -> int:
        """The parent of a sequence's first block key: KV computed under a LoRA adapter is its own."""
        return self.salt if not seq.lora_id else hash((self.salt, seq.lora_id))

    def can_start(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether ``seq`` (holding no blocks) fits ``num_tokens`` positions when it starts from ``hits``."""
        needed = -(-num_tokens // self.block_size) - len(hits)
        held_by_nobody = sum(1 for block in hits if self._refs[block] == 0)  # these leave the free pool
        return needed <= self.num_free_blocks - held_by_nobody

    def start_from(self, seq: Sequence, hits: list[int]) -> None:
        """Give ``seq`` the cached blocks ``hits`` (from ``match_prefix``): their tokens count as computed.
        Every admission comes through here, so it counts the lookup (``prefix_queries``, ``prefix_hits``)."""
        assert not seq.block_table, "start_from is for a sequence that holds no blocks"
        for block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = list(hits)
        self.tables.write(seq, 0)
        seq.block_keys = [self._key_of[block] for block in hits]
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens

    def cache_computed(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that are now full of computed tokens the host knows (a token still on
        the device, computed by an overlapped step, waits for the next call)."""
        if not self.enable_prefix_caching:
            return
        computed, known = seq.num_computed_tokens, len(seq.prompt_token_ids) + len(seq.output_token_ids)
        full = (computed if computed < known else known) // self.block_size
        if len(seq.block_keys) >= full:
            return
        size = self.block_size
        for index in range(len(seq.block_keys), full):
            parent = hash(seq.block_keys[-1]) if seq.block_keys else self._root(seq)
            key = (parent, tuple(seq.token_slice(index * size, (index + 1) * size)))
            seq.block_keys.append(key)
            block = seq.block_table[index]
            if key not in self._block_of and block not in self._key_of:
                # (a key already cached elsewhere: another sequence computed the same prefix at the same
                # time; this copy stays private and is freed as usual)
                self._block_of[key] = block
                self._key_of[block] = key

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (blocks in use stay cached until released)."""
        for block in list(self._evictable):
            self._uncache(block)
            self._free.append(block)
        self._evictable.clear()

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        self._uncache(block)
        return block

    def _uncache(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]

    def check_invariants(self, holders: list[Sequence]) -> None:
        """Every block is free, evictable or held, each held block's count equals its holders (tests)."""
        counts = [0] * self.num_blocks
        for seq in holders:
            for block in seq.block_table:
                counts[block] += 1
            row = self.tables.array[seq.table_row] if seq.table_row >= 0 else np.zeros(0, dtype=np.int32)
            assert (
                row[: len(seq.block_table)].tolist() == seq.block_table
                and not row[len(seq.block_table) :].any()
            ), "a block table's array row differs from its list"
        assert counts == self._refs, "reference counts differ from the sequences' block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable, "a block is free twice"
        for block in range(1, self.num_blocks):
            held = counts[block] > 0
            assert held + (block in free) + (block in evictable) == 1, (
                f"block {block} is lost or doubly owned"
            )
            assert (block in evictable) <= (block in self._key_of), "an evictable block is not cached"
        assert all(self._block_of[key] == block for block, key in self._key_of.items())


class BlockTableArray:
    """Every sequence's block table also kept as a row of one int32 array, written only when its blocks
    change: a step's [sequences, pages] table for the paged kernels is then one gather of rows (vLLM's
    persistent block table), not rebuilt from lists. Past a table's end a row holds the pad block."""

    def __init__(self) -> None:
        self.array = np.zeros((16, 16), dtype=np.int32)  # [rows, pages], as the paged kernels read tables
        self._spare = list(range(15, -1, -1))  # rows no sequence holds (all pad)

    def write(self, seq: Sequence, first: int) -> None:
        """Copy ``seq.block_table[first:]`` into its row, giving it a row if it has none."""
        table = seq.block_table
        if seq.table_row < 0:
            seq.table_row = self._take_row()
        if len(table) > self.array.shape[1]:
            grown = np.zeros((self.array.shape[0], max(len(table), 2 * self.array.shape[1])), np.int32)
            grown[:, : self.array.shape[1]] = self.array
            self.array = grown
        self.array[seq.table_row, first : len(table)] = table[first:]

    def cut(self, seq: Sequence, keep: int) -> None:
        """The table was cut to its first ``keep`` blocks."""
        self.array[seq.table_row, keep:] = PAD_BLOCK

    def release(self, seq: Sequence) -> None:
        if seq.table_row >= 0:
            self.array[seq.table_row] = PAD_BLOCK
            self._spare.append(seq.table_row)
            seq.table_row = -1

    def _take_row(self) -> int:
        if not self._spare:
            old = self.array.shape[0]
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self._spare = list(range(2 * old - 1, old - 1, -1))
        return self._spare.pop()
