"""Paged drivers for tests: PagedRunner runs a model over one sequence chunk by chunk, run_backend_steps runs an
attention backend over several sequences in a given step pattern; both through a paged KV cache."""

from __future__ import annotations

import random

import torch

from longserve.attention.backend import AttentionBackend, get_backend
from longserve.attention.metadata import build_attention_metadata
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.loading.checkpoint import load_checkpoint
from longserve.models.registry import build_model

BLOCK = 4


class PagedRunner:
    """Drives our model over one sequence, chunk by chunk, through a paged cache with shuffled blocks."""

    def __init__(self, directory: str, backend: str) -> None:
        checkpoint = load_checkpoint(directory)
        self.model, config = build_model(checkpoint.config, get_backend(backend), torch.float32)
        self.model.load_weights(checkpoint.weights)
        self.model.prepare_for_inference()
        num_blocks = 64
        self.caches = allocate_kv_cache(
            config.num_layers, num_blocks, BLOCK, config.num_kv_heads, config.head_dim, torch.float32
        )
        generator = torch.Generator().manual_seed(0)
        self.block_table = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
        self.computed = 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> torch.Tensor:
        n = len(token_ids)
        metadata = build_attention_metadata([self.block_table], [self.computed], [n], BLOCK)
        positions = torch.arange(self.computed, self.computed + n)
        hidden = self.model(torch.tensor(token_ids), positions, self.caches, metadata)
        self.computed += n
        return self.model.compute_logits(hidden)  # [n, vocab]


def random_prompt(vocab_size: int, length: int) -> list[int]:
    """A fixed pseudo-random prompt (ids >= 3 skip the special tokens)."""
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(7)).tolist()


def hf_logits_cache(directory_of, prompt_length: int):
    """``get(arch) -> (prompt, HF fp32 logits [len, vocab])``, computed once per architecture."""
    from tiny_models import load_hf_model

    cache: dict[str, tuple[list[int], torch.Tensor]] = {}

    def get(arch: str) -> tuple[list[int], torch.Tensor]:
        if arch not in cache:
            model = load_hf_model(directory_of(arch))
            prompt = random_prompt(model.config.vocab_size, prompt_length)
            with torch.no_grad():
                cache[arch] = prompt, model(torch.tensor([prompt])).logits[0].float()
        return cache[arch]

    return get


def whole_prompt_logits(directory: str, backend: str, prompt: list[int]) -> torch.Tensor:
    return PagedRunner(directory, backend).feed(prompt)


def chunked_then_stepwise_logits(directory: str, backend: str, prompt: list[int]) -> torch.Tensor:
    """Uneven chunks crossing block boundaries, then one token at a time (the paged decode path)."""
    runner = PagedRunner(directory, backend)
    rows = [runner.feed(prompt[:5]), runner.feed(prompt[5:11])]
    rows += [runner.feed([token]) for token in prompt[11:]]
    return torch.cat(rows)


def run_backend_steps(
    backend: AttentionBackend,
    seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    chunks: list[list[int]],
    block_size: int,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Feed each sequence's (q, k, v) through ``backend``: step s gives sequence i ``chunks[s][i]`` new tokens
    (0: not scheduled). Decodes go first in each step, as the engine orders them; blocks are scattered.
    Returns every sequence's outputs, concatenated over the steps."""
    rng = random.Random(0)
    num_blocks = 1 + sum(-(-len(s[0]) // block_size) for s in seqs) + 8
    free = list(range(1, num_blocks))
    rng.shuffle(free)  # scattered, non-contiguous blocks
    tables = [[free.pop() for _ in range(-(-len(s[0]) // block_size))] for s in seqs]
    kv_heads, dim = seqs[0][1].shape[1:]
    cache = allocate_kv_cache(1, num_blocks, block_size, kv_heads, dim, dtype)[0]
    outputs: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    for step_chunks in chunks:
        order = sorted(range(len(seqs)), key=lambda i: not (step_chunks[i] == 1 and done[i] > 0))
        order = [i for i in order if step_chunks[i]]
        meta = build_attention_metadata(
            [tables[i] for i in order], [done[i] for i in order], [step_chunks[i] for i in order], block_size
        )
        q, k, v = (
            torch.cat([seqs[i][j][done[i] : done[i] + step_chunks[i]] for i in order]) for j in range(3)
        )
        out = backend.forward(q, k, v, cache, meta, dim**-0.5)
        row = 0
        for i in order:
            outputs[i].append(out[row : row + step_chunks[i]])
            row += step_chunks[i]
            done[i] += step_chunks[i]
    return [torch.cat(o) for o in outputs]
