"""AttentionMetadata: where this step's tokens sit in the paged KV cache, built once per step for all layers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch


@dataclass
class PrefillSpan:
    """One sequence whose chunk has more than one new token (or whose context is only this chunk)."""

    query_start: int  # first row of this sequence in the step's flattened tokens
    query_len: int  # new tokens this step
    context_len: int  # tokens in the cache after this step (cached prefix + query_len)

    @property
    def cached_len(self) -> int:
        """Tokens of the context cached before this step (0: the chunk is the whole context)."""
        return self.context_len - self.query_len


@dataclass
class PagedPrefills:
    """The step's prompt chunks as the paged prefill kernel reads them (part of the step's one upload)."""

    block_tables: torch.Tensor  # [num_prefills, max_pages] int32, padded with block 0
    query_starts: torch.Tensor  # [num_prefills + 1] int32 row offsets, counted from the first prefill row
    context_lens: torch.Tensor  # [num_prefills] int32: cached prefix + chunk
    max_query_len: int  # the longest chunk (the kernel's grid)

    def to(self, device: torch.device | str) -> PagedPrefills:
        return replace(
            self,
            block_tables=self.block_tables.to(device, non_blocking=True),
            query_starts=self.query_starts.to(device, non_blocking=True),
            context_lens=self.context_lens.to(device, non_blocking=True),
        )


@dataclass
class AttentionMetadata:
    """Per-step layout of the flattened batch. Decode rows (one new token each) come first, then prefills.

    Decodes are described as paged kernels want them (as vLLM does): an int32 block table and an int32
    context length per sequence, built once per step on the host and copied once to the device; so are the
    prompt chunks (``paged_prefills``). The dense per-position slot tables that gather-based paths need are
    derived from them on the device, at most once per step, and only if a layer asks for them.
    """

    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each new token
    num_decodes: int  # the first num_decodes rows are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32, padded with block 0
    decode_seq_lens: torch.Tensor | None  # [num_decodes] int32 context lengths (including the new token)
    decode_context_lens: list[int]  # the same lengths as host ints (loop bounds, kernel grid sizes)
    prefills: list[PrefillSpan]
    block_size: int = 16  # tokens per cache block: slot // block_size is the block (page) of a slot
    # The context length the split-K decode kernel sizes its splits for; None: this step's longest. The CUDA
    # runner sets the engine's longest allowed context, so eager steps and captured graphs sum in the same
    # order and give the same bits.
    split_context: int | None = None
    paged_prefills: PagedPrefills | None = None  # the prefills by block table (the runner's upload)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()

    @property
    def max_decode_len(self) -> int:
        return max(self.decode_context_lens, default=0)

    @cached_property
    def _decode_valid(self) -> torch.Tensor:
        positions = torch.arange(self.max_decode_len, device=self.decode_seq_lens.device)
        return positions[None, :] < self.decode_seq_lens[:, None]  # [num_decodes, max_len]

    @cached_property
    def decode_slots(self) -> torch.Tensor | None:
        """[num_decodes, max_decode_len] cache slot of every context position; padding reads slot 0."""
        if not self.num_decodes:
            return None
        block = self.block_size
        positions = torch.arange(self.max_decode_len, device=self.decode_block_tables.device)
        blocks = self.decode_block_tables[:, positions // block].long()  # [num_decodes, max_len]
        return torch.where(self._decode_valid, blocks * block + positions % block, 0)

    @cached_property
    def decode_mask(self) -> torch.Tensor | None:
        """[num_decodes, 1, 1, max_len] True where a key is valid; None when no context is padded."""
        if not self.num_decodes or len(set(self.decode_context_lens)) == 1:
            return None
        return self._decode_valid[:, None, None, :]

    def prefill_slots(self, index: int, start: int, stop: int) -> torch.Tensor:
        """[stop - start] cache slots of positions [start, stop) of prefill ``index``, from its block table."""
        tables = self.paged_prefills.block_tables  # [num_prefills, max_pages]
        positions = torch.arange(start, stop, device=tables.device)
        return (
            tables[index, positions // self.block_size].long() * self.block_size + positions % self.block_size
        )

    def context_slots(self, index: int) -> torch.Tensor:
        """[context_len] cache slots of prefill ``index``'s whole context (cached prefix and chunk), built once
        per step for the paths that gather the context."""
        built = self._context_slots
        if index not in built:
            built[index] = self.prefill_slots(index, 0, self.prefills[index].context_len)
        return built[index]

    @cached_property
    def _context_slots(self) -> dict[int, torch.Tensor]:
        return {}

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """The same layout with its index tensors on ``device`` (built on the CPU, used where the cache is)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self,
            slot_mapping=move(self.slot_mapping),
            decode_block_tables=move(self.decode_block_tables),
            decode_seq_lens=move(self.decode_seq_lens),
            paged_prefills=None if self.paged_prefills is None else self.paged_prefills.to(device),
        )


def context_slots(block_table: list[int], num_tokens: int, block_size: int, start: int = 0) -> torch.Tensor:
    """Cache slots of positions [start, num_tokens) for a sequence with this block table."""
    positions = torch.arange(start, num_tokens)
    blocks = torch.tensor(block_table, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


# Spans of up to this many tokens after a cached prefix run as decode rows (decode kernels, CUDA graphs);
# longer ones as prefill chunks.
MAX_DECODE_ROWS = 16


@dataclass
class AttentionPlan:
    """The step's layout in plain ints (no tensors yet): the CUDA runner uploads these lists in one copy."""

    decode_new_slots: np.ndarray  # int64 [num_decodes]: the slot each decode row writes
    decode_tables: np.ndarray  # int32 [num_decodes, width], padded with block 0
    decode_lens: list[int]  # [num_decodes] context lengths, the new token included
    prefill_new_slots: list[torch.Tensor]  # per prefill: [query_len] slots written
    prefills: list[PrefillSpan]
    block_size: int
    prefill_tables: np.ndarray | None = None  # int32 [num_prefills, width], padded with block 0

    def prefill_ints(self) -> list[np.ndarray | list[int]]:
        """The prefills' block tables (flat), row offsets and context lengths, for ``PagedPrefills``."""
        starts = [0]
        for span in self.prefills:
            starts.append(starts[-1] + span.query_len)
        tables = self.prefill_tables.reshape(-1) if self.prefills else []
        return [tables, starts, [span.context_len for span in self.prefills]]

    def paged_prefills(self, ints: torch.Tensor) -> PagedPrefills | None:
        """``prefill_ints`` back as tensors (one int32 tensor, wherever it lives, cut into its parts)."""
        if not self.prefills:
            return None
        count, width = self.prefill_tables.shape
        tables, starts, lens = ints.split([count * width, count + 1, count])
        return PagedPrefills(tables.view(count, width), starts, lens, max(s.query_len for s in self.prefills))

    @property
    def num_decodes(self) -> int:
        return len(self.decode_lens)

    def metadata(
        self,
        slot_mapping: torch.Tensor,
        tables: torch.Tensor | None,
        lens: torch.Tensor | None,
        split_context: int | None = None,
        paged_prefills: PagedPrefills | None = None,
    ) -> AttentionMetadata:
        """The metadata over tensors made from this plan (wherever they live)."""
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=self.num_decodes,
            decode_block_tables=tables,
            decode_seq_lens=lens,
            decode_context_lens=self.decode_lens,
            prefills=self.prefills,
            block_size=self.block_size,
            split_context=split_context,
            paged_prefills=paged_prefills,
        )


def plan_attention(
    block_tables: list[list[int]],
    computed_lens: list[int],
    query_lens: list[int],
    block_size: int,
    table_array: np.ndarray | None = None,
    table_rows: list[int] | None = None,
) -> AttentionPlan:
    """The layout of sequences ordered decodes-first; ``computed_lens`` counts tokens already cached.

    ``table_array`` [rows, pages] holds the same tables as rows (the block manager's ``BlockTableArray``),
    ``table_rows`` each sequence's row: the decode tables are then gathered from it, not copied from lists."""
    if not len(block_tables) == len(computed_lens) == len(query_lens):
        raise ValueError("one block table, computed length and query length per sequence")
    plan = AttentionPlan(
        np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int32), [], [], [], block_size
    )
    # The leading plain decodes (one new token after a cached prefix) take no per-sequence work beyond this
    # scan: their tables, lengths and slots are computed over arrays below.
    num_plain = 0
    for computed, qlen in zip(computed_lens, query_lens, strict=True):
        if qlen != 1 or computed == 0:
            break
        num_plain += 1
    decode_tables = block_tables[:num_plain]  # one per decoding sequence
    verifying: list[int] = []  # the indices of those after the plain decodes
    positions = computed_lens[:num_plain]  # per decode row: the position of its new token
    table_of_row: list[int] | None = None  # per decode row, its table (None: row i is table i)
    prefill_tables: list[list[int]] = []
    query_start = num_plain
    for index in range(num_plain, len(block_tables)):
        table, computed, qlen = block_tables[index], computed_lens[index], query_lens[index]
        context_len = computed + qlen
        if qlen == 1 and computed > 0 and plan.prefills:
            raise ValueError("decode sequences must come before prefill sequences")
        if computed > 0 and qlen <= MAX_DECODE_ROWS and not plan.prefills:
            # A few tokens after a cached prefix (speculative drafts to verify): one decode row per token,
            # each attending the prefix and the rows before it (their keys are cached first).
            if table_of_row is None:
                table_of_row = list(range(len(decode_tables)))
            table_of_row.extend([len(decode_tables)] * qlen)
            decode_tables.append(table)
            verifying.append(index)
            positions.extend(range(computed, context_len))
        else:
            plan.prefill_new_slots.append(context_slots(table, context_len, block_size, start=computed))
            plan.prefills.append(PrefillSpan(query_start, qlen, context_len))
            prefill_tables.append(table)
        query_start += qlen
    if decode_tables:
        plan.decode_lens = [position + 1 for position in positions]
        width = max(positions) // block_size + 1
        if table_array is not None:
            rows = table_rows[:num_plain] + [table_rows[index] for index in verifying]
            tables = table_array[rows, :width]
            assert tables.shape[1] == width, "the table array is narrower than a decode's context"
        else:
            tables = padded_tables(decode_tables, width)
        if table_of_row is not None:
            tables = tables[table_of_row]
        at = np.asarray(positions, dtype=np.int64)  # [decode rows]
        plan.decode_tables = tables  # [decode rows, width]
        blocks = tables[np.arange(len(at)), at // block_size].astype(np.int64)  # [decode rows]
        plan.decode_new_slots = blocks * block_size + at % block_size
    if prefill_tables:
        width = max(-(-span.context_len // block_size) for span in plan.prefills)
        plan.prefill_tables = padded_tables(prefill_tables, width)
    return plan


def padded_tables(tables: list[list[int]], width: int) -> np.ndarray:
    """``tables`` as one int32 array [len(tables), width], each padded with block 0 or cut."""
    out = np.zeros((len(tables), width), dtype=np.int32)
    for row, table in enumerate(tables):
        used = min(len(table), width)
        out[row, :used] = table[:used]
    return out


def build_attention_metadata(
    block_tables: list[list[int]],
    computed_lens: list[int],
    query_lens: list[int],
    block_size: int,
) -> AttentionMetadata:
    """Metadata (CPU tensors) for sequences ordered decodes-first; ``computed_lens`` counts cached tokens."""
    return host_metadata(plan_attention(block_tables, computed_lens, query_lens, block_size))


def host_metadata(plan: AttentionPlan) -> AttentionMetadata:
    """The plan's metadata over CPU tensors."""
    tables = lens = None
    if plan.num_decodes:
        tables = torch.from_numpy(plan.decode_tables).to(torch.int32)  # [num_decodes, width]
        lens = torch.tensor(plan.decode_lens, dtype=torch.int32)  # [num_decodes]
    slots = torch.cat([torch.from_numpy(plan.decode_new_slots), *plan.prefill_new_slots])
    ints = [torch.as_tensor(np.asarray(part, dtype=np.int64)) for part in plan.prefill_ints()]
    paged = plan.paged_prefills(torch.cat(ints).to(torch.int32))
    return plan.metadata(slots, tables, lens, paged_prefills=paged)
