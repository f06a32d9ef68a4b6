"""MTP drafts (``mtp``): DeepSeek-V3's multi-token-prediction layer (models/deepseek_mtp.py) proposes from the
target's own final hidden states.

The MTP layer's row p reads the target's hidden state at p and token p + 1, so it trails the target by one
token and keeps its own one-layer KV cache. After every target step the runner hands over the hidden states
of the step's rows (``observe``): prompt rows are caught up at once (their next token is known); the rest wait
for the step's tokens. Drafting (``propose``) first catches each sequence up to its last known token, whose
row gives the first draft; each further draft is one more row fed the previous row's MTP hidden state. Those
rows are guesses, so their KV is dropped at the next catch-up (only rows made from the target's hidden
states stay). A greedy draft is a point mass: ``rejection`` keeps the target's distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from longserve.attention.dense import DenseAttention
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.config import EngineConfig
from longserve.engine.kv_cache import BlockManager
from longserve.engine.model_runner import ModelRunner
from longserve.engine.sampling_ops import greedy_argmax
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.scheduler import ScheduledSequence
from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.proposer import DraftProposer
from longserve.loading.checkpoint import load_checkpoint
from longserve.models.deepseek_mtp import DeepseekMTP, mtp_layer_count

_GREEDY = SamplingParams(temperature=0)
_CATCH_UP = 2048  # rows per catch-up forward pass (summed over sequences)
_MAX_GAP = 8192  # the most rows the target never ran (a prefix-cache hit) filled with zero hidden states


@dataclass
class _MTPState:
    shadow: Sequence  # token p + 1 at index p; its block table is in the MTP layer's cache
    real: int = 0  # rows computed from the target's hidden states (valid KV)
    hidden: torch.Tensor | None = None  # [m, hidden]: the target's hidden states of rows real .. real + m
    # Gave up (its cache did not fit, or too many rows were never run): no drafts, nothing kept
    disabled: bool = False


class MTPProposer(DraftProposer):
    """Keeps an MTP state per sequence the target has run (from its first prompt chunk on)."""

    needs_hidden_states = True

    def __init__(self, target: EngineConfig, loaded, kv_cache_memory_mb: int, max_model_len: int) -> None:
        arch = (loaded.hf_config.get("architectures") or [None])[0]
        if arch != "DeepseekV3ForCausalLM" or not mtp_layer_count(loaded.hf_config):
            raise ValueError(
                "speculative_config method 'mtp' needs a DeepSeek-V3 checkpoint that carries its "
                f"multi-token-prediction layer (num_nextn_predict_layers >= 1); {target.model!r} is {arch} "
                f"with num_nextn_predict_layers={loaded.hf_config.get('num_nextn_predict_layers')!r}"
            )
        if target.tensor_parallel_size > 1:
            raise ValueError(
                "speculative_config method 'mtp' runs on one device: tensor_parallel_size must be 1"
            )
        device = next(loaded.model.parameters()).device
        mc, dtype = loaded.model_config, target.torch_dtype
        self.hidden_size, self.dtype, self.device = mc.hidden_size, dtype, device
        self.model = DeepseekMTP(mc, DenseAttention(), dtype)
        self.model.load_weights(load_checkpoint(target.model, revision=target.revision).weights)
        self.model.to(device).eval()
        self.model.prepare_for_inference()
        bytes_per_block = 2 * mc.num_kv_heads * mc.head_dim * dtype.itemsize * target.block_size
        num_blocks = max(2, kv_cache_memory_mb * 2**20 // bytes_per_block)
        self.cache = allocate_kv_cache(
            1, num_blocks, target.block_size, mc.num_kv_heads, mc.head_dim, dtype, device
        )[0]
        self.blocks = BlockManager(num_blocks, target.block_size, enable_prefix_caching=False)
        # Only its step preparation is used (inputs and attention metadata); the MTP layer runs here.
        self.runner = ModelRunner(
            self.model, [self.cache], target.block_size, device, max_context=max_model_len,
            block_tables=self.blocks.tables,
        )  # fmt: skip
        self._states: dict[Sequence, _MTPState] = {}

    def observe(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """A target step ran (its sequences' computed counts not yet advanced): keep each row's hidden state
        [tokens, hidden] and catch up the rows whose next token is known."""
        row, ready = 0, []
        for item in scheduled:
            seq, count = item.seq, item.num_new_tokens
            state = self._state(seq)
            self._align(state, seq.num_computed_tokens)
            rows = hidden[row : row + count]
            row += count
            if state.disabled:
                continue
            state.hidden = rows.clone() if state.hidden is None else torch.cat([state.hidden, rows])
            ready.append((seq, state))
        self._catch_up(ready, want_logits=False)

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` greedy drafts after each sequence's last token."""
        drafts: list[list[int]] = [[] for _ in seqs]
        pairs = []
        for seq in seqs:
            state = self._state(seq)
            self._align(state, seq.num_computed_tokens)
            pairs.append((seq, state))
        logits, last_hidden = self._catch_up(pairs, want_logits=True)
        active = []  # (index in seqs, state, the MTP hidden state of its last row)
        for i, (_, state) in enumerate(pairs):
            if i not in logits:
                continue
            drafts[i].append(int(greedy_argmax(logits[i][None])[0]))
            if lengths[i] > 1 and self.blocks.can_grow(state.shadow, state.real + lengths[i] - 1):
                self.blocks.grow(state.shadow, state.real + lengths[i] - 1)
                active.append((i, state, last_hidden[i]))
        while active:  # one row per sequence a pass: the previous draft, fed the previous row's MTP state
            for i, state, _ in active:
                state.shadow.output_token_ids.append(drafts[i][-1])
            scheduled = [ScheduledSequence(state.shadow, 1) for _, state, _ in active]
            previous = torch.stack([h for _, _, h in active])  # [rows, hidden]
            out = self._forward(scheduled, previous)  # [rows, hidden]
            tokens = greedy_argmax(self.model.compute_logits(out)).tolist()
            still = []
            for j, (i, state, _) in enumerate(active):
                state.shadow.num_computed_tokens += 1
                drafts[i].append(tokens[j])
                if len(drafts[i]) < lengths[i]:
                    still.append((i, state, out[j]))
            active = still
        return drafts

    def finish(self, seq: Sequence) -> None:
        state = self._states.pop(seq, None)
        if state is not None:
            self.blocks.free(state.shadow)

    def _state(self, seq: Sequence) -> _MTPState:
        """The sequence's state, its shadow holding tokens 1 .. known - 1 and only the real rows' KV."""
        state = self._states.get(seq)
        known = seq.num_known_tokens
        if state is None:
            shadow = Sequence(seq.request_id, 0, seq.token_slice(1, known), _GREEDY, frozenset(), known + 1)
            state = self._states[seq] = _MTPState(shadow)
        shadow = state.shadow
        if shadow.output_token_ids or shadow.num_prompt_tokens < known - 1:
            shadow.prompt_token_ids.extend(seq.token_slice(1 + shadow.num_prompt_tokens, known))
            shadow.output_token_ids = []
        shadow.max_total_tokens = seq.max_total_tokens + 1
        shadow.num_computed_tokens = state.real
        self.blocks.trim(shadow, state.real)
        return state

    def _disable(self, state: _MTPState) -> None:
        state.disabled, state.hidden = True, None
        self.blocks.free(state.shadow)

    def _align(self, state: _MTPState, computed: int) -> None:
        """Make the kept hidden states cover exactly rows ``real`` .. ``computed`` (the target's computed
        tokens): rejected drafts' rows go; a target that recomputes (a preempted sequence) restarts it there;
        rows the target never ran (a prefix-cache hit) get zero hidden states, so the MTP layer sees their
        tokens only and drafts from an approximate cache (drafts are verified, so output is unchanged); more
        than _MAX_GAP such rows disable the sequence's drafts."""
        if state.disabled:
            return
        if computed < state.real:
            state.real = state.shadow.num_computed_tokens = computed
            self.blocks.trim(state.shadow, computed)
            state.hidden = None
        have = 0 if state.hidden is None else len(state.hidden)
        if state.real + have > computed:
            state.hidden = state.hidden[: computed - state.real]
        elif computed - state.real - have > _MAX_GAP:
            self._disable(state)
        elif state.real + have < computed:
            gap = torch.zeros(
                computed - state.real - have, self.hidden_size, dtype=self.dtype, device=self.device
            )
            state.hidden = gap if state.hidden is None else torch.cat([state.hidden, gap])

    def _catch_up(
        self, pairs: list[tuple[Sequence, _MTPState]], want_logits: bool
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Run each state's rows whose next token is known, in passes of at most _CATCH_UP rows; with
        ``want_logits``, the logits [vocab] and MTP hidden state of each state's last row, by index in
        ``pairs`` (a state that computed nothing new, or found no room, gives none)."""
        logits: dict[int, torch.Tensor] = {}
        last_hidden: dict[int, torch.Tensor] = {}
        pending = []
        for index, (seq, state) in enumerate(pairs):
            ready = min(
                len(state.hidden) if state.hidden is not None else 0, seq.num_known_tokens - 1 - state.real
            )
            if ready <= 0 or state.disabled:
                continue
            if not self.blocks.can_grow(state.shadow, state.real + ready):
                self._disable(state)  # its hidden states would pile up waiting for room
                continue
            self.blocks.grow(state.shadow, state.real + ready)
            pending.append((index, state, ready))
        while pending:
            budget, batch, rest = _CATCH_UP, [], []
            for index, state, ready in pending:
                take = min(ready, max(budget, 1)) if budget > 0 else 0
                budget -= take
                if take:
                    batch.append((index, state, take, take == ready))
                if take < ready:
                    rest.append((index, state, ready - take))
            batch.sort(key=lambda b: not (b[2] == 1 and b[1].real > 0))  # decodes first
            scheduled = [ScheduledSequence(state.shadow, take) for _, state, take, _ in batch]
            previous = torch.cat([state.hidden[:take] for _, state, take, _ in batch])  # [rows, hidden]
            out = self._forward(scheduled, previous)  # [rows, hidden]
            row = 0
            for index, state, take, last in batch:
                state.real += take
                state.shadow.num_computed_tokens = state.real
                state.hidden = state.hidden[take:]
                row += take
                if last and want_logits:
                    last_hidden[index] = out[row - 1]
                    logits[index] = self.model.compute_logits(out[row - 1 : row])[0]
            pending = rest
        return logits, last_hidden

    @torch.inference_mode()
    def _forward(self, scheduled: list[ScheduledSequence], previous: torch.Tensor) -> torch.Tensor:
        """The MTP layer over the scheduled rows (single-row decodes first, as the runner lays steps out)."""
        step, _, _ = self.runner.describe(scheduled)
        model_input = self.runner.prepare(replace(step, logit_rows=None))
        return self.model(
            model_input.input_ids, model_input.positions, previous, self.cache, model_input.metadata
        )
