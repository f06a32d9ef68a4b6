"""Model runner: turns a SchedulerOutput into flat model inputs, runs the forward pass, returns the logits needed.

A step is first described in host ints (``StepDescription``); with tensor parallelism rank 0 sends that
description to the other ranks (``ranks.lead``), and every rank turns it into the same inputs and runs the same
forward pass on its shard (``follow``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from longserve.attention.metadata import AttentionMetadata, plan_attention
from longserve.attention.paged_cache import LayerKVCache
from longserve.engine.cuda_graphs import DecodeGraphs
from longserve.engine.kv_cache import BlockTableArray
from longserve.engine.scheduler import ScheduledSequence
from longserve.engine.uploads import StepUploader
from longserve.lora.slots import LoRARows


@dataclass
class StepDescription:
    """One forward pass as every rank runs it: host ints only, cheap to send to the other ranks."""

    ids: list[int]  # [tokens]
    positions: list[int]  # [tokens]
    logit_rows: list[int] | None  # rows that need logits; None: return the hidden states (embeddings)
    block_tables: list[list[int]]  # per sequence, decodes first
    num_computed: list[int]  # per sequence: tokens already in the cache
    num_new: list[int]  # per sequence: tokens this step adds
    may_replay: bool  # decode-only without prompt logprobs: a captured CUDA graph may run it
    # Overlapped steps: rows whose input token the previous step sampled and the host has not read yet; row
    # fed_rows[i] takes that step's sampled token fed_from[i], on the device.
    fed_rows: list[int] = field(default_factory=list)
    fed_from: list[int] = field(default_factory=list)
    lora_slots: list[int] | None = None  # per sequence: its LoRA adapter's slot (-1: none); None: no LoRA
    # Per sequence: its table's row in the leading rank's BlockTableArray (None: none; other ranks read the
    # tables themselves)
    table_rows: list[int] | None = None


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    metadata: AttentionMetadata
    logit_rows: torch.Tensor  # [rows] which token rows need logits (sampling rows, then prompt-logprob rows)


@dataclass
class RunnerOutput:
    # [num_sampling, vocab] float32: one row per sequence that completes, 1 + its drafts' with drafts
    sample_logits: torch.Tensor
    sample_index: list[int]  # index into the scheduled list of each sampled sequence
    prompt_logits: dict[
        int, torch.Tensor
    ]  # scheduled index -> [chunk_tokens, vocab] logits for prompt logprobs
    # [tokens, hidden] final hidden states of every row, in the step's order (each scheduled sequence's rows
    # in turn), when the runner keeps them (``keep_hidden``: MTP drafts read them); else None
    hidden: torch.Tensor | None = None


class ModelRunner:
    """Owns the model and the paged cache tensors; one ``execute`` call per engine step."""

    def __init__(
        self,
        model: nn.Module,
        caches: list[LayerKVCache],
        block_size: int,
        device: torch.device | str = "cpu",
        graphs: DecodeGraphs | None = None,  # replays decode-only steps; None: every step eager
        max_context: int | None = None,  # the engine's longest context (sizes the decode kernel's splits)
        ranks=None,  # EngineRanks (tensor_parallel.py): rank 0 sends each step to the others; None: one device
        lora_rows: LoRARows | None = None,  # where each step says which rows run which adapter (lora/)
        block_tables: BlockTableArray | None = None,  # the scheduler's sequences' tables as array rows
    ) -> None:
        self.block_tables = block_tables
        self.lora_rows = lora_rows
        self.max_context = max_context
        self.graphs = graphs
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.ranks = ranks
        self.uploader = StepUploader(self.device)
        self.keep_hidden = False  # RunnerOutput.hidden: every row's final hidden state (MTP drafts)

    def describe(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[StepDescription, list[int], dict[int, range]]:
        """The step's description, each sampled sequence's scheduled index, and the prompt-logprob rows.

        A sequence with drafts gets ``num_draft_tokens + 1`` sampling rows in a row: its last token's and each
        draft's."""
        ids: list[int] = []
        positions: list[int] = []
        fed_rows: list[int] = []
        fed_from: list[int] = []
        sample_rows: list[int] = []
        sample_index: list[int] = []
        prompt_rows: dict[int, range] = {}
        for index, item in enumerate(scheduled):
            seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            first_row = len(ids)
            known = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            drafts = item.num_draft_tokens
            if count > 1:
                ids.extend(seq.token_slice(start, start + count - drafts))
                if drafts:  # verified in this step: one row per draft after the sequence's last token
                    ids.extend(item.draft_token_ids)
                positions.extend(range(start, start + count))
            else:
                if start < known:
                    ids.append(seq.token_at(start))
                else:  # sampled by the step still in flight: fed to this one on the device
                    fed_rows.append(first_row)
                    fed_from.append(seq.pending_row)
                    ids.append(0)
                positions.append(start)
            if start + count == known + seq.num_pending_tokens + drafts:  # item.completes_sequence
                if drafts:  # a row to verify each
                    sample_rows.extend(range(len(ids) - 1 - drafts, len(ids)))
                elif item.logits_every_row:
                    sample_rows.extend(range(first_row, len(ids)))
                else:
                    sample_rows.append(len(ids) - 1)
                sample_index.append(index)
            if seq.params.prompt_logprobs is not None and wants_prompt_logprobs(item):
                end = start + count
                # Row r predicts token r + 1; the last prompt token predicts the first output token.
                last = min(end, seq.num_prompt_tokens - 1)
                prompt_rows[index] = range(first_row, first_row + last - start)
        logit_rows = sample_rows + [row for rows in prompt_rows.values() for row in rows]
        single = len(ids) == len(scheduled)  # one token each: each position is its sequence's computed count
        description = StepDescription(
            ids,
            positions,
            logit_rows,
            [s.seq.block_table for s in scheduled],
            positions if single else [s.seq.num_computed_tokens for s in scheduled],
            [1] * len(scheduled) if single else [s.num_new_tokens for s in scheduled],
            # A graph computes logits for every row: a one-token chunk short of its prompt's end is a decode
            # row that samples nothing, so such a step runs eagerly (``logits_every_row`` avoids that).
            may_replay=not prompt_rows and len(sample_rows) == len(ids),
            fed_rows=fed_rows,
            fed_from=fed_from,
            lora_slots=[s.seq.lora_slot for s in scheduled] if self.lora_rows is not None else None,
            table_rows=[s.seq.table_row for s in scheduled] if self.block_tables is not None else None,
        )
        return description, sample_index, prompt_rows

    def prepare(self, step: StepDescription, fed_tokens: torch.Tensor | None = None) -> ModelInput:
        """The step's tensors on the device, from one host-to-device copy on CUDA (on the CPU, views of one
        tensor: the same code either way). ``fed_tokens`` [rows] are the previous step's sampled tokens, still
        on the device, that ``step.fed_rows`` take as their input."""
        if step.fed_rows and fed_tokens is None:
            raise ValueError("the step feeds tokens from the previous step, but none were given")
        rows = step.table_rows if self.block_tables is not None else None
        array = self.block_tables.array if rows is not None else None
        plan = plan_attention(
            step.block_tables, step.num_computed, step.num_new, self.block_size, array, rows
        )
        logit_rows = step.logit_rows or []
        # The decode tables are int32 already: they ride as int64 pairs (no cast, half the bytes).
        flat_tables = plan.decode_tables.reshape(-1)
        if len(flat_tables) % 2:
            flat_tables = np.append(flat_tables, np.int32(0))
        uploaded = self.uploader.upload(
            [
                [step.ids],
                [step.positions],
                [step.fed_rows, step.fed_from],
                [logit_rows],
                [plan.decode_new_slots, *plan.prefill_new_slots],
                [flat_tables.view(np.int64)],
                [plan.decode_lens, *plan.prefill_ints()],
            ]
        )
        input_ids, positions_t, fed, rows, slots, table_pairs, lens_and_prefills = uploaded
        if step.fed_rows:
            count = len(step.fed_rows)
            input_ids.index_copy_(0, fed[:count], fed_tokens.index_select(0, fed[count:]))
        tables = lens = None
        small = lens_and_prefills.to(torch.int32)  # one cast for the other int32 tensors
        if plan.num_decodes:
            num, width = plan.decode_tables.shape
            tables = table_pairs.view(torch.int32)[: num * width].view(num, width)  # [num_decodes, width]
            lens = small[:num]  # [num_decodes]
        paged = plan.paged_prefills(small[plan.num_decodes :])
        metadata = plan.metadata(slots, tables, lens, split_context=self.max_context, paged_prefills=paged)
        return ModelInput(input_ids, positions_t, metadata, rows)

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSequence], fed_tokens: torch.Tensor | None = None
    ) -> RunnerOutput:
        """Run the scheduled sequences; ``fed_tokens`` is the previous step's sampled tokens when some of
        their inputs are still on the device (``Sequence.pending_row`` indexes it)."""
        step, sample_index, prompt_rows = self.describe(scheduled)
        self._lead(step)
        logits, hidden = self._forward(step, fed_tokens)  # [rows, vocab], [tokens, hidden]
        num_sampling = len(step.logit_rows) - sum(len(rows) for rows in prompt_rows.values())
        prompt_logits: dict[int, torch.Tensor] = {}
        offset = num_sampling
        for index, rows in prompt_rows.items():
            prompt_logits[index] = logits[offset : offset + len(rows)]
            offset += len(rows)
        return RunnerOutput(
            logits[:num_sampling], sample_index, prompt_logits, hidden if self.keep_hidden else None
        )

    def run(self, step: StepDescription, fed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Rank 0: send the step to the other ranks, then run it: logits [rows, vocab], or the hidden states
        [tokens, hidden] when ``step.logit_rows`` is None."""
        self._lead(step)
        return self._forward(step, fed_tokens)[0]

    def follow(self, step: StepDescription, fed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run a described step on this rank's shard (every rank runs every step, collectives included)."""
        return self._forward(step, fed_tokens)[0]

    def _lead(self, step: StepDescription) -> None:
        if self.ranks is not None:
            if step.fed_rows and self.ranks.tp.is_parallel:
                raise ValueError("the other ranks cannot see tokens fed on rank 0's device")
            self.ranks.lead(step)

    @torch.inference_mode()
    def _forward(
        self, step: StepDescription, fed_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits [rows, vocab] (its hidden states when ``step.logit_rows`` is None) and the final
        hidden states of every token row [tokens, hidden]."""
        model_input = self.prepare(step, fed_tokens)
        if self.lora_rows is not None:
            self.lora_rows.set(step.lora_slots or [-1] * len(step.num_new), step.num_new)
        metadata = model_input.metadata
        if (
            self.graphs is not None
            and step.may_replay
            and step.logit_rows is not None
            and not metadata.prefills
            and metadata.num_decodes <= self.graphs.max_batch
        ):
            # Every row of a replayable step is a decode that samples: the graph computes their logits.
            assert len(step.logit_rows) == metadata.num_decodes
            return self.graphs.run(model_input.input_ids, model_input.positions, metadata)
        hidden = self.model(model_input.input_ids, model_input.positions, self.caches, metadata)
        if step.logit_rows is None:
            return hidden, hidden
        return self.model.compute_logits(hidden[model_input.logit_rows]), hidden  # [rows, vocab]


def wants_prompt_logprobs(item: ScheduledSequence) -> bool:
    """Prompt logprobs are still missing for some of this chunk's tokens (a recompute may repeat rows)."""
    seq = item.seq
    return (
        seq.params.prompt_logprobs is not None
        and seq.num_computed_tokens < seq.num_prompt_tokens - 1
        and len(seq.prompt_logprobs) < seq.num_prompt_tokens
    )
