"""Embedder: pooled final hidden states of inputs, computed between engine steps (an encoder in one forward
over its inputs laid back to back; a decoder through the paged cache, in prompt chunks)."""

from __future__ import annotations

import torch

from longserve.engine.kv_cache import BlockManager
from longserve.engine.model_runner import ModelRunner, StepDescription
from longserve.engine.pooling import ChunkPooler, pool_sequences
from longserve.engine.protocol import CacheBusyError
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence
from longserve.loading.pooling_config import PoolingConfig


class Embedder:
    """Embeddings of token-id inputs with the engine's model, runner and KV blocks."""

    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        model,
        pooling: PoolingConfig,
        is_encoder: bool,
        *,
        vocab_size: int,
        max_tokens: int,  # the longest input (context length, cache capacity)
        step_tokens: int,  # tokens per forward (the engine's per-step budget)
    ) -> None:
        self.runner, self.blocks, self.model, self.pooling = runner, blocks, model, pooling
        self.is_encoder = is_encoder
        self.vocab_size, self.max_tokens, self.step_tokens = vocab_size, max_tokens, step_tokens

    def embed_batch(self, token_lists: list[list[int]]) -> list[list[float]]:
        """``embed`` of each input; an encoder runs them together, as few forwards as the token budget allows."""
        if not self.is_encoder:
            return [self.embed(ids) for ids in token_lists]
        for ids in token_lists:
            self._check_embedding_input(ids)
        embeddings: list[list[float]] = []
        batch: list[list[int]] = []
        batch_tokens = 0
        for ids in token_lists:
            if batch and batch_tokens + len(ids) > self.step_tokens:
                embeddings += self._encode(batch)
                batch, batch_tokens = [], 0
            batch.append(ids)
            batch_tokens += len(ids)
        return embeddings + self._encode(batch)

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> list[float]:
        """The pooled final hidden states of ``token_ids`` (``self.pooling``: the checkpoint's sentence-
        transformers config, else the family's default; a chat model's is the L2-normalised mean).

        Call it between steps on the engine's thread: a decoder borrows free KV blocks through a throwaway
        sequence (prefill attention reads keys back from the paged cache) and returns them before it comes back.
        """
        if self.is_encoder:
            return self.embed_batch([token_ids])[0]
        self._check_embedding_input(token_ids)
        seq = Sequence(
            "embed",
            0,
            list(token_ids),
            SamplingParams(),
            eos_token_ids=frozenset(),
            max_total_tokens=len(token_ids),
        )
        if not self.blocks.can_grow(seq, len(token_ids)):
            # Running requests hold the blocks: a transient condition, unlike a too-long input.
            raise CacheBusyError(
                f"KV cache busy: the input needs {len(token_ids)} tokens of cache, "
                f"{self.blocks.num_free_blocks * self.blocks.block_size} are free now"
            )
        self.blocks.grow(seq, len(token_ids))
        pooler = ChunkPooler(self.pooling)
        try:
            budget = self.step_tokens
            for start in range(0, len(token_ids), budget):
                chunk = token_ids[start : start + budget]
                step = StepDescription(
                    chunk,
                    list(range(start, start + len(chunk))),
                    None,  # the hidden states, not logits
                    [seq.block_table],
                    [start],
                    [len(chunk)],
                    may_replay=False,
                )
                hidden = self.runner.run(step)  # [chunk, hidden]
                pooler.add(hidden)
        finally:
            self.blocks.free(seq)
        return pooler.result().tolist()

    @torch.inference_mode()
    def _encode(self, token_lists: list[list[int]]) -> list[list[float]]:
        """An encoder's embeddings of checked inputs, in one forward over their tokens laid back to back."""
        seq_lens = [len(ids) for ids in token_lists]
        flat = torch.tensor(
            [t for ids in token_lists for t in ids], dtype=torch.long, device=self.runner.device
        )
        hidden = self.model.encode(flat, seq_lens)  # [tokens, hidden]
        return [vector.tolist() for vector in pool_sequences(hidden, seq_lens, self.pooling)]

    def _check_embedding_input(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("input must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        limit = self.max_tokens
        if len(token_ids) > limit:
            raise ValueError(
                f"this model's maximum context length is {limit} tokens, but the input has {len(token_ids)}"
            )
