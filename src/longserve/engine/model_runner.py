"""Model runner: turns a SchedulerOutput into flat model inputs, runs the forward pass, returns the logits needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longserve.attention.metadata import AttentionMetadata, build_attention_metadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.engine.scheduler import ScheduledSequence


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


class ModelRunner:
    """Owns the model and the paged cache tensors; one ``execute`` call per engine step."""

    def __init__(
        self,
        model: nn.Module,
        caches: list[LayerKVCache],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.device = torch.device(device)

    def prepare(self, scheduled: list[ScheduledSequence]) -> tuple[ModelInput, list[int], dict[int, range]]:
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
        metadata = build_attention_metadata(
            [s.seq.block_table for s in scheduled],
            [s.seq.num_computed_tokens for s in scheduled],
            [s.num_new_tokens for s in scheduled],
            self.block_size,
        )
        extra_rows = [row for rows in prompt_rows.values() for row in rows]
        # Built on the host, then copied once per step to where the model runs.
        model_input = ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            metadata=metadata if self.device.type == "cpu" else metadata.to(self.device),
            logit_rows=torch.tensor(sample_rows + extra_rows, dtype=torch.long).to(
                self.device, non_blocking=True
            ),
        )
        return model_input, sample_index, prompt_rows

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> RunnerOutput:
        model_input, sample_index, prompt_rows = self.prepare(scheduled)
        hidden = self.model(model_input.input_ids, model_input.positions, self.caches, model_input.metadata)
        logits = self.model.compute_logits(hidden[model_input.logit_rows])  # [rows, vocab]
        num_sampling = len(sample_index)
        prompt_logits: dict[int, torch.Tensor] = {}
        offset = num_sampling
        for index, rows in prompt_rows.items():
            prompt_logits[index] = logits[offset : offset + len(rows)]
            offset += len(rows)
        return RunnerOutput(logits[:num_sampling], sample_index, prompt_logits)


def wants_prompt_logprobs(item: ScheduledSequence) -> bool:
    """Prompt logprobs are still missing for some of this chunk's tokens (a recompute may repeat rows)."""
    seq = item.seq
    return (
        seq.params.prompt_logprobs is not None
        and seq.num_computed_tokens < seq.num_prompt_tokens - 1
        and len(seq.prompt_logprobs) < seq.num_prompt_tokens
    )
