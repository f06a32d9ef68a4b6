"""Draft-model drafts (``draft_model``): a smaller model with the target's vocabulary, its own weights, KV cache
and runner. Each step it catches up on the tokens its sequences gained since, then decodes k tokens greedily
for all of them in one batch per token. A greedy draft is a point mass, so ``rejection`` keeps the target's
distribution exactly for sampled requests too."""

from __future__ import annotations

from dataclasses import replace

import torch

from longserve.attention.metadata import MAX_DECODE_ROWS
from longserve.config import EngineConfig
from longserve.distributed.parallel import TensorParallel
from longserve.engine.kv_cache import BlockManager
from longserve.engine.model_loading import allocate_caches, build_graphs, graph_rows, load_model
from longserve.engine.model_runner import ModelRunner
from longserve.engine.sampling_ops import greedy_argmax
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.scheduler import ScheduledSequence
from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.proposer import DraftProposer

_GREEDY = SamplingParams(temperature=0)
_CATCH_UP = 2048  # tokens of catching up per forward pass (summed over sequences)


class DraftModelProposer(DraftProposer):
    """Keeps a shadow sequence per drafting sequence in the draft model's own paged cache."""

    def __init__(
        self, target: EngineConfig, model: str, kv_cache_memory_mb: int, vocab_size: int, max_model_len: int
    ) -> None:
        config = replace(
            target, model=model, revision=None, kv_cache_memory_mb=kv_cache_memory_mb, num_kv_blocks=None,
            speculative_config=None, attention="dense", tensor_parallel_size=1, show_progress=False,
        )  # fmt: skip
        device = torch.device(config.device)
        loaded = load_model(config, device, TensorParallel())
        if loaded.model_config.vocab_size != vocab_size:
            raise ValueError(
                f"speculative_config model {model!r}: its vocabulary has {loaded.model_config.vocab_size} "
                f"tokens, the target's {vocab_size}; a draft model must share the target's tokenizer"
            )
        num_blocks, caches = allocate_caches(config, loaded, device, TensorParallel())
        self.blocks = BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
        # Its passes are decode rows (a catch-up of a few tokens too, every row sampling): on CUDA they replay
        # captured graphs, as many rows as the target's verification steps take.
        graphs = build_graphs(
            config, loaded, caches, device, TensorParallel(), max_model_len, max_rows=graph_rows(target)
        )
        self.runner = ModelRunner(
            loaded.model, caches, config.block_size, device, graphs=graphs, max_context=max_model_len,
            block_tables=self.blocks.tables,
        )  # fmt: skip
        self._shadows: dict[Sequence, Sequence] = {}

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` greedy draft tokens after each sequence's last token."""
        active: list[tuple[int, Sequence]] = []  # (index in seqs, its shadow)
        for i, (seq, length) in enumerate(zip(seqs, lengths, strict=True)):
            shadow = self._sync(seq)
            if self.blocks.can_grow(shadow, shadow.num_tokens + length - 1):
                self.blocks.grow(shadow, shadow.num_tokens + length - 1)
                active.append((i, shadow))
        # Each pass's tokens stay on the device and feed the next pass there (the shadow's pending token, as
        # the engine's overlapped steps feed theirs): the host prepares pass j + 1 while pass j runs, and reads
        # every draft back once at the end.
        picks: list[list[int]] = [[] for _ in seqs]  # per sequence, its drafts' indices in the passes' tokens
        passes: list[torch.Tensor] = []
        fed, offset = None, 0
        while active:
            # The first pass catches each shadow up on the tokens it has not computed (a new sequence: its
            # prompt, in chunks of at most _CATCH_UP tokens a pass); the later ones decode the draft just made.
            budget, scheduled = _CATCH_UP, []
            for _, shadow in active:
                count = min(shadow.num_uncomputed_tokens, max(budget, 1))
                budget -= count
                # A few tokens after its cache (the target's last accepted draft and its own token) are
                # decode rows: with every row's logits the pass replays a graph instead of running eagerly.
                every_row = 1 < count <= MAX_DECODE_ROWS and shadow.num_computed_tokens > 0
                scheduled.append(ScheduledSequence(shadow, count, logits_every_row=every_row))
            # decodes, then catch-ups (decode rows too), then new prompts: the order the step metadata takes
            order = sorted(
                range(len(active)),
                key=lambda j: 0 if scheduled[j].is_decode else 1 if scheduled[j].logits_every_row else 2,
            )
            ordered = [scheduled[j] for j in order]
            result = self.runner.execute(ordered, fed)
            # [sample rows]: one per item of result.sample_index, a catch-up's every row
            fed = greedy_argmax(result.sample_logits)
            passes.append(fed)
            for item in ordered:
                item.seq.num_computed_tokens += item.num_new_tokens
            still, row = [], 0
            for position in result.sample_index:
                row += ordered[position].num_new_tokens if ordered[position].logits_every_row else 1
                i, shadow = active[order[position]]
                picks[i].append(offset + row - 1)  # the item's last row: what follows its last token
                if len(picks[i]) < lengths[i]:
                    shadow.num_pending_tokens += 1  # the next pass's input, on the device
                    shadow.pending_row = row - 1
                    still.append((i, shadow))
            offset += fed.shape[0]
            active = still  # (a shadow still catching up drafts nothing this step)
        tokens = torch.cat(passes).tolist() if passes else []
        drafts = [[tokens[j] for j in indices] for indices in picks]
        for seq, draft in zip(seqs, drafts, strict=True):
            shadow = self._shadows[seq]
            if shadow.num_pending_tokens:  # the drafts it was fed: all but the last
                shadow.output_token_ids.extend(draft[: shadow.num_pending_tokens])
                shadow.num_pending_tokens = 0
        return drafts

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of ``seq`` holding its known tokens; KV computed from drafts that the target did not
        take is dropped (positions from the first draft that differs from what the target now holds)."""
        shadow = self._shadows.get(seq)
        known = seq.num_known_tokens
        if shadow is None:
            shadow = Sequence(seq.request_id, 0, seq.token_slice(0, known), _GREEDY, frozenset(), known + 1)
            self._shadows[seq] = shadow
            return shadow
        base = shadow.num_prompt_tokens
        valid = shadow.num_computed_tokens
        for offset, token in enumerate(shadow.output_token_ids):
            if base + offset >= known or seq.token_at(base + offset) != token:
                valid = min(valid, base + offset)
                break
        shadow.prompt_token_ids.extend(seq.token_slice(base, known))
        shadow.output_token_ids = []
        shadow.num_computed_tokens = min(valid, known - 1)
        shadow.max_total_tokens = seq.max_total_tokens + 1
        self.blocks.trim(shadow, shadow.num_computed_tokens)
        return shadow

    def finish(self, seq: Sequence) -> None:
        shadow = self._shadows.pop(seq, None)
        if shadow is not None:
            self.blocks.free(shadow)
