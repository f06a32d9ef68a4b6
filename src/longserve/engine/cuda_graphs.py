"""CUDA graphs for decode steps: the whole forward (every layer, then the logits) captured once per batch-size
bucket, replayed with the step's inputs copied into static buffers. A step of hundreds of kernel launches
becomes one replay.

A decode batch of n sequences runs in the smallest bucket >= n; the padding rows write their K/V to slot 0 (the
cache's reserved padding block) and attend one key there, so they touch no real sequence. The paged decode
kernel's grid depends on the batch only: each sequence's context is spread over a fixed number of splits
inside the kernel (``paged_decode``), so one capture serves every context length.

Only steps that are all decodes, need no prompt logprobs and fit the largest bucket are replayed; prefill and
mixed steps run eagerly. A model says whether its decode path is capture-safe (``supports_cuda_graphs``: no
data-dependent shapes or host syncs): MoE blocks are when their Triton or grouped_mm experts run, MLA when the
paged decode kernel takes its head size (any up to 256). MoBA decodes are: their gating, block-sparse reads
and block-mean bookkeeping all decide on the device. The reference backend runs eagerly.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes captured for ``max_batch`` concurrent sequences (max_batch itself always included)."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Captured decode forwards, one per bucket, sharing one memory pool and one set of static inputs."""

    def __init__(
        self,
        model: nn.Module,
        caches: list[LayerKVCache],
        block_size: int,
        max_batch: int,
        max_context: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.buckets = bucket_sizes(max_batch)
        self.max_context = max_context
        max_pages = -(-max_context // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)  # [batch]
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, vocab] logits
        self._hidden: dict[int, torch.Tensor] = {}  # bucket -> [bucket, hidden] final hidden states
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def capture_all(self) -> None:
        """Capture every bucket (largest first, so the smaller ones reuse its memory); logs time and memory."""
        start, before = time.perf_counter(), torch.cuda.memory_allocated()
        for bucket in reversed(self.buckets):
            self._capture(bucket)
        torch.cuda.synchronize()
        log.info(
            "captured CUDA graphs for decode batches %s in %.1f s (%.0f MiB)",
            self.buckets,
            time.perf_counter() - start,
            (torch.cuda.memory_allocated() - before) / 2**20,
        )

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        metadata = self._metadata(bucket)
        args = (self.input_ids[:bucket], self.positions[:bucket], self.caches, metadata)
        # Warm up on a side stream first: Triton compiles and cuBLAS picks its kernels outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model.compute_logits(self.model(*args))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._hidden[bucket] = self.model(*args)
            self._outputs[bucket] = self.model.compute_logits(self._hidden[bucket])
        self._pool = graph.pool()
        self._graphs[bucket] = graph

    def _metadata(self, bucket: int) -> AttentionMetadata:
        # The longest context allowed: the block tables' width and the split count's upper bound.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            num_decodes=bucket,
            decode_block_tables=self.block_tables[:bucket],
            decode_seq_lens=self.seq_lens[:bucket],
            decode_context_lens=[self.max_context] * bucket,
            prefills=[],
            block_size=self.block_size,
            split_context=self.max_context,
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits [batch, vocab] and final hidden states [batch, hidden] of a decode-only step (inputs
        already on the device). The next replay overwrites them: read them (on the same stream) before it."""
        batch = input_ids.shape[0]
        bucket = self.bucket_for(batch)
        if bucket not in self._graphs:
            self._capture(bucket)
        width = metadata.decode_block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(metadata.slot_mapping)
        self.block_tables[:batch, :width].copy_(metadata.decode_block_tables)
        self.seq_lens[:batch].copy_(metadata.decode_seq_lens)
        if batch < bucket:  # padding rows: write to and read from the reserved padding block only
            self.slot_mapping[batch:bucket].zero_()
            self.seq_lens[batch:bucket].fill_(1)
            self.block_tables[batch:bucket, :1].zero_()
        self._graphs[bucket].replay()
        return self._outputs[bucket][:batch], self._hidden[bucket][:batch]
