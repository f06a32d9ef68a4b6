"""Model runner: turns a SchedulerOutput into flat model inputs, runs the forward pass, returns the logits needed.

A step is first described in host ints (``StepDescription``); with tensor parallelism rank 0 sends that
description to the other ranks (``ranks.lead``), and every rank turns it into the same inputs and runs the same
forward pass on its shard (``follow``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from longserve.attention.metadata import (
    AttentionMetadata,
    AttentionPlan,
    host_metadata,
    plan_attention,
)
from longserve.attention.paged_cache import LayerKVCache
from longserve.engine.cuda_graphs import DecodeGraphs
from longserve.engine.scheduler import ScheduledSequence


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


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    metadata: AttentionMetadata
    logit_rows: torch.Tensor  # [rows] which token rows need logits (sampling rows, then prompt-logprob rows)


@dataclass
class RunnerOutput:
    sample_logits: torch.Tensor  # [num_sampling, vocab] float32, one row per sequence that completes
    sample_index: list[int]  # index into the scheduled list for each sampling row
    prompt_logits: dict[
        int, torch.Tensor
    ]  # scheduled index -> [chunk_tokens, vocab] logits for prompt logprobs


Segment = list[int] | torch.Tensor  # a run of int64 values: host ints or a 1-D CPU tensor


class StepUploader:
    """Copies a step's host indices to the device in one transfer, through a persistent pinned buffer.

    Each part (a concatenation of segments) becomes one int64 view into one device buffer, so a step costs one
    host-to-device copy however many index lists it has. Host ints are written straight into the pinned
    buffer through its numpy view (no intermediate tensors: on a slow host each small torch op costs ~10 µs).
    The host buffer is refilled only after the previous copy out of it has completed (an event, not a device
    sync); the device buffer is refilled by a copy queued behind the previous step's kernels on the same
    stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host = torch.empty(0, dtype=torch.long)
        self._device = torch.empty(0, dtype=torch.long, device=device)
        self._copied: torch.cuda.Event | None = None

    def upload(self, parts: list[list[Segment]]) -> list[torch.Tensor]:
        total = sum(_length(segment) for part in parts for segment in part)
        if self._copied is not None:
            self._copied.synchronize()
        if total > self._host.numel():
            capacity = max(total, 2 * self._host.numel(), 4096)
            self._host = torch.empty(capacity, dtype=torch.long, pin_memory=True)
            self._device = torch.empty(capacity, dtype=torch.long, device=self.device)
        host = self._host.numpy()
        bounds, offset = [], 0
        for part in parts:
            start = offset
            for segment in part:
                n = _length(segment)
                if isinstance(segment, torch.Tensor):
                    self._host[offset : offset + n].copy_(segment.reshape(-1))
                else:
                    host[offset : offset + n] = segment
                offset += n
            bounds.append((start, offset))
        self._device[:total].copy_(self._host[:total], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return [self._device[start:stop] for start, stop in bounds]


def _length(segment: Segment) -> int:
    return segment.numel() if isinstance(segment, torch.Tensor) else len(segment)


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
    ) -> None:
        self.max_context = max_context
        self.graphs = graphs
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.ranks = ranks
        self.uploader = StepUploader(self.device) if self.device.type == "cuda" else None

    def describe(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[StepDescription, list[int], dict[int, range]]:
        """The step's description, each sampling row's scheduled index, and the prompt-logprob rows."""
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sample_index: list[int] = []
        prompt_rows: dict[int, range] = {}
        for index, item in enumerate(scheduled):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            first_row = len(ids)
            ids.extend(seq.token_ids()[start:end] if item.num_new_tokens > 1 else [seq.token_at(start)])
            positions.extend(range(start, end))
            if item.completes_sequence:
                sample_rows.append(len(ids) - 1)
                sample_index.append(index)
            if wants_prompt_logprobs(item):
                # Row r predicts token r + 1; the last prompt token predicts the first output token.
                last = min(end, seq.num_prompt_tokens - 1)
                prompt_rows[index] = range(first_row, first_row + last - start)
        logit_rows = sample_rows + [row for rows in prompt_rows.values() for row in rows]
        description = StepDescription(
            ids,
            positions,
            logit_rows,
            [s.seq.block_table for s in scheduled],
            [s.seq.num_computed_tokens for s in scheduled],
            [s.num_new_tokens for s in scheduled],
            may_replay=not prompt_rows,
        )
        return description, sample_index, prompt_rows

    def prepare(self, step: StepDescription) -> ModelInput:
        """The step's tensors on the device (one host-to-device copy on CUDA)."""
        plan = plan_attention(step.block_tables, step.num_computed, step.num_new, self.block_size)
        logit_rows = step.logit_rows or []
        if self.uploader is not None:
            return self._upload(step.ids, step.positions, logit_rows, plan)
        metadata = host_metadata(plan)
        tensors = [torch.tensor(x, dtype=torch.long) for x in (step.ids, step.positions, logit_rows)]
        return ModelInput(*tensors[:2], metadata, tensors[2])

    def _upload(
        self, ids: list[int], positions: list[int], logit_rows: list[int], plan: AttentionPlan
    ) -> ModelInput:
        """The step's inputs on the device from one host-to-device copy."""
        flat_tables = [block for table in plan.decode_tables for block in table]
        uploaded = self.uploader.upload(
            [
                [ids],
                [positions],
                [logit_rows],
                [plan.decode_new_slots, *plan.prefill_new_slots],
                [flat_tables, plan.decode_lens],
                *([span.context_slots] for span in plan.prefills if span.context_slots is not None),
            ]
        )
        input_ids, positions_t, rows, slots, tables_and_lens, *context = uploaded
        tables = lens = None
        if plan.num_decodes:  # one cast for both int32 tensors
            small = tables_and_lens.to(torch.int32)
            tables = small[: len(flat_tables)].view(plan.num_decodes, -1)  # [num_decodes, width]
            lens = small[len(flat_tables) :]  # [num_decodes]
        contexts = iter(context)
        prefills = [
            span if span.context_slots is None else replace(span, context_slots=next(contexts))
            for span in plan.prefills
        ]
        metadata = plan.metadata(slots, tables, lens, prefills, split_context=self.max_context)
        return ModelInput(input_ids, positions_t, metadata, rows)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> RunnerOutput:
        step, sample_index, prompt_rows = self.describe(scheduled)
        logits = self.run(step)  # [rows, vocab]
        num_sampling = len(sample_index)
        prompt_logits: dict[int, torch.Tensor] = {}
        offset = num_sampling
        for index, rows in prompt_rows.items():
            prompt_logits[index] = logits[offset : offset + len(rows)]
            offset += len(rows)
        return RunnerOutput(logits[:num_sampling], sample_index, prompt_logits)

    @torch.inference_mode()
    def run(self, step: StepDescription) -> torch.Tensor:
        """Rank 0: send the step to the other ranks, then run it: logits [rows, vocab], or the hidden states
        [tokens, hidden] when ``step.logit_rows`` is None."""
        if self.ranks is not None:
            self.ranks.lead(step)
        return self.follow(step)

    @torch.inference_mode()
    def follow(self, step: StepDescription) -> torch.Tensor:
        """Run a described step on this rank's shard (every rank runs every step, collectives included)."""
        model_input = self.prepare(step)
        metadata = model_input.metadata
        if (
            self.graphs is not None
            and step.may_replay
            and step.logit_rows is not None
            and not metadata.prefills
            and metadata.num_decodes <= self.graphs.max_batch
        ):
            hidden = self.graphs.run(model_input.input_ids, model_input.positions, metadata)
        else:
            hidden = self.model(model_input.input_ids, model_input.positions, self.caches, metadata)
        if step.logit_rows is None:
            return hidden
        return self.model.compute_logits(hidden[model_input.logit_rows])  # [rows, vocab]


def wants_prompt_logprobs(item: ScheduledSequence) -> bool:
    """Prompt logprobs are still missing for some of this chunk's tokens (a recompute may repeat rows)."""
    seq = item.seq
    return (
        seq.params.prompt_logprobs is not None
        and seq.num_computed_tokens < seq.num_prompt_tokens - 1
        and len(seq.prompt_logprobs) < seq.num_prompt_tokens
    )
