"""Sampler: turns one step's logits into next tokens (penalties, temperature, top-k/p, min-p) and logprobs.

Processing order follows vLLM / the OpenAI API: the structured-output grammar's token mask, min_tokens masking
(unless it would leave the grammar nothing), then repetition / presence / frequency penalties, then greedy argmax or temperature -> top-k -> top-p -> min-p -> sample. Logprobs are always taken
from the raw model logits, before any of that processing.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from longserve.engine.penalties import PenaltyState
from longserve.engine.protocol import TokenLogprob
from longserve.engine.sampled_rows import LogprobRows, SampledRows, SamplerOutput
from longserve.engine.sampling_ops import (
    compute_logprobs,
    greedy_argmax,
    logprob_entries,
    logprob_tensors,
    sample_rows,
    target_probs,
)
from longserve.engine.sampling_table import SamplingTable, draw_uniforms, rows_as_params
from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.rejection import accepted_runs, verify_rows
from longserve.engine.structured_output import GrammarMasker
from longserve.engine.uploads import StepUploader, as_floats, float_bits

log = logging.getLogger(__name__)

# prompt_logprobs over a long prompt: rows per log_softmax so memory stays ~rows * vocab floats.
_PROMPT_LOGPROB_CHUNK = 256


class Sampler:
    """Batched sampler the engine calls once per step on the rows that produce a token."""

    def __init__(self, fused_kernel: bool = True) -> None:
        # fused_kernel: on a GPU, sample in one Triton launch (sampling_kernel.py) rather than ~120 torch ops
        self._fused_kernel = fused_kernel
        self._table: SamplingTable | None = None  # built with the first sampled row
        self._penalties: PenaltyState | None = None  # built with the first penalized row
        self._grammar_masker: GrammarMasker | None = None  # built with the first constrained row
        self._uploaders: dict[torch.device, StepUploader] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """Pick one token per row. ``logits`` is ``[num_seqs, vocab]``, row i belongs to ``seqs[i]``."""
        return self.sample(logits, seqs).to_host()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledRows:
        """Queue the sampling of one token per row on the logits' device; nothing waits for the device
        unless a row needs host state (a grammar's mask, penalties over its output)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [num_seqs={len(seqs)}, vocab], got {tuple(logits.shape)}")
        if all(seq.plain_greedy for seq in seqs) or not any(_needs_processing(seq) for seq in seqs):
            # The common decode step: plain greedy, nothing to mask or report.
            return SampledRows(greedy_argmax(logits))
        try:
            return self._sample(logits, seqs)
        except Exception:  # logged loudly; then each row alone, so only the row that fails loses its token
            log.exception("batched sampling of %d rows failed; sampling the rows one by one", len(seqs))
        return self._sample_each(logits, seqs)

    def verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> SampledRows:
        """Accept drafts (``rejection.py``) and sample the token after them, reading back at once.
        ``logits`` ``[sum(len(d) + 1), vocab]``: ``seqs[i]``'s rows are its last token's, then each draft's."""
        if logits.dim() != 2 or logits.shape[0] != sum(len(d) + 1 for d in drafts):
            raise ValueError(f"logits must have one row per sequence and draft, got {tuple(logits.shape)}")
        try:
            return SampledRows(torch.empty(0), resolved=self._verify(logits, seqs, drafts))
        except (
            Exception
        ):  # logged loudly; then each sequence alone, so only the one that fails loses its step
            log.exception("verifying the drafts of %d sequences failed; one by one", len(seqs))
        out = SamplerOutput([-1] * len(seqs), [None] * len(seqs))
        row = 0
        for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            rows = slice(row, row + len(draft) + 1)
            row = rows.stop
            try:
                one = self._verify(logits[rows], [seq], [draft])
            except Exception as exc:
                log.exception("verifying drafts failed for request %s", seq.request_id)
                out.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
                continue
            out.token_ids[i], out.logprobs[i] = one.token_ids[0], one.logprobs[0]
            if 0 in one.errors:
                out.errors[i] = one.errors[0]
            if 0 in one.accepted:
                out.accepted[i] = one.accepted[0]
        return SampledRows(torch.empty(0), resolved=out)

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> SamplerOutput:
        row_seqs = [seq for seq, draft in zip(seqs, drafts, strict=True) for _ in range(len(draft) + 1)]
        raw = logits.float()  # [rows, vocab]
        drafted = [
            draft[:j] for draft in drafts for j in range(len(draft) + 1)
        ]  # each row's drafts before it
        processed, row_errors, _ = self._process(raw, row_seqs, drafted)  # (penalties: counted below)
        row_drafts = [token for draft in drafts for token in (*draft, -1)]
        greedy = [seq.params.greedy for seq in row_seqs]
        uploader = self._uploader(raw.device)
        invalid = None
        if all(greedy):
            draft_ids = uploader.upload([[row_drafts]])[0]
            tokens = greedy_argmax(processed)  # [rows]
            accepted = draft_ids == tokens
        else:
            table = self._sampling_table(raw.shape[1])
            rows = table.rows(row_seqs)  # (first: it may grow the table)
            uniform = draw_uniforms(table.values[rows], row_seqs)
            row_params = rows_as_params(table.values[rows], uniform, self._uploader(raw.device))
            accept_uniform = [
                math.nan if seq.generator is None or token < 0 or g
                else torch.rand(1, dtype=torch.float64, generator=seq.generator).item()
                for seq, token, g in zip(row_seqs, row_drafts, greedy, strict=True)
            ]  # fmt: skip
            draft_ids, accept_bits = uploader.upload([[row_drafts], [float_bits(accept_uniform)]])
            probs, invalid = target_probs(processed, row_params)
            accepted, tokens = verify_rows(
                probs, draft_ids, accept_bits.view(torch.float64), row_params.uniform, row_params.any_seeded
            )
            # A bonus row (after the last draft) samples as a plain step would at that position, with the
            # same uniform: a seeded sequence then draws the same token with or without others' drafts.
            bonus = [row for row, token in enumerate(row_drafts) if token < 0]
            index = torch.tensor(bonus, device=raw.device)
            bonus_tokens, bonus_invalid = self._draw(
                processed.index_select(0, index), [row_seqs[row] for row in bonus], uniform[bonus]
            )
            tokens = tokens.index_copy(0, index, bonus_tokens)
            invalid = invalid.index_copy(0, index, invalid.index_select(0, index) | bonus_invalid)
            if any(greedy):
                best = greedy_argmax(processed)
                tokens = torch.where(row_params.greedy, best, tokens)
                accepted = torch.where(row_params.greedy, draft_ids == best, accepted)
                invalid &= ~row_params.greedy
        emitted = torch.where(accepted, draft_ids, tokens)  # [rows]: each row's token if the run reaches it
        wants = [seq.params.logprobs for seq in row_seqs]
        entries = None
        if any(w is not None for w in wants):
            tensors = logprob_tensors(raw, emitted, max(w or 0 for w in wants))
            host = [t.tolist() for t in tensors]
            entries = logprob_entries(emitted.tolist(), *host, [w or 0 for w in wants])
        host_tokens, host_accepted = tokens.tolist(), accepted.tolist()
        bad = set(row_errors) | (set(invalid.nonzero().flatten().tolist()) if invalid is not None else set())
        out = SamplerOutput([-1] * len(seqs), [None] * len(seqs))
        for i, run in enumerate(accepted_runs(drafts, host_accepted)):
            first = run.token_row - len(run.accepted)
            failed = sorted(row for row in range(first, run.token_row + 1) if row in bad)
            if failed:
                out.errors[i] = row_errors.get(
                    failed[0],
                    "sampling failed: the next-token probabilities are not finite (NaN or infinite logits)",
                )
                continue
            out.token_ids[i] = host_tokens[run.token_row]
            if entries is not None and wants[run.token_row] is not None:
                out.logprobs[i] = entries[run.token_row]
            if seqs[i].params.has_penalty:  # what the run emits counts from the next step on
                self._penalties.add([seqs[i]], [[*run.accepted, out.token_ids[i]]])
            if run.accepted:
                out.accepted[i] = [
                    (token, entries[first + j] if entries is not None and wants[first] is not None else None)
                    for j, token in enumerate(run.accepted)
                ]
        return out

    def _sample_each(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledRows:
        out = SamplerOutput([-1] * len(seqs), [None] * len(seqs))
        for i, seq in enumerate(seqs):
            try:
                row = self._sample(logits[i : i + 1], [seq]).to_host()
            except Exception as exc:
                log.exception("sampling failed for request %s", seq.request_id)
                out.errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
                continue
            out.token_ids[i], out.logprobs[i] = row.token_ids[0], row.logprobs[0]
            if row.errors:
                out.errors[i] = row.errors[0]
        fed = torch.tensor([max(t, 0) for t in out.token_ids], device=logits.device)
        return SampledRows(fed, resolved=out)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: list[int], num_top: int
    ) -> list[TokenLogprob]:
        """Logprob of ``target_ids[i]`` under row i of ``logits`` ``[n, vocab]``, plus ``num_top`` alternatives."""
        if logits.shape[0] != len(target_ids):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(target_ids)} target ids")
        out: list[TokenLogprob] = []
        for start in range(0, len(target_ids), _PROMPT_LOGPROB_CHUNK):
            end = start + _PROMPT_LOGPROB_CHUNK
            rows = target_ids[start:end]
            out.extend(compute_logprobs(logits[start:end], rows, [num_top] * len(rows)))
        return out

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """Add to ``seq.prompt_logprobs`` those of the prompt chunk that ran from position ``start``
        (``logits`` ``[chunk, vocab]``); a recompute repeats rows already recorded, which are kept."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        targets = seq.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]]
        entries = self.prompt_logprobs(logits, targets, seq.params.prompt_logprobs)
        for offset, entry in enumerate(entries):
            if start + 1 + offset == len(seq.prompt_logprobs):
                seq.prompt_logprobs.append(entry)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledRows:
        raw = logits.float()  # [num_seqs, vocab]
        params = [seq.params for seq in seqs]
        n = len(seqs)
        logits, errors, penalty_rows = self._process(raw, seqs)

        # Every row is sampled and greedy rows pick their argmax instead: no row gather, so no host wait.
        invalid = None
        if all(p.greedy for p in params):
            token_ids = greedy_argmax(logits)  # [num_seqs]
        else:
            token_ids, invalid = self._draw(logits, seqs)

        if penalty_rows is not None:  # the chosen tokens count from the next step on, on the device
            rows, slots = penalty_rows
            self._penalties.count(slots, token_ids.index_select(0, rows))
        wanted = {
            i: p.logprobs or 0 for i, p in enumerate(params) if p.logprobs is not None and i not in errors
        }
        logprobs = None
        if wanted:
            # On the CPU only the wanted rows; on a GPU every row, as picking rows would wait for the device.
            rows = list(wanted) if logits.device.type == "cpu" else list(range(n))
            chosen = token_ids if len(rows) == n else token_ids[torch.tensor(rows)]
            tensors = logprob_tensors(_take_rows(raw, rows), chosen, max(wanted.values()))
            logprobs = LogprobRows(rows, wanted, tensors)
        return SampledRows(token_ids, invalid=invalid, logprobs=logprobs, errors=errors)

    def _process(self, raw: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]] | None = None):
        """``raw`` logits ``[n, vocab]`` with grammars, min_tokens and penalties applied (a copy when any
        applies); the rows whose grammar broke; and the penalised rows to count the chosen tokens for.
        ``drafted[i]``: the drafts verified before row i (its grammar's mask is the one after them)."""
        params = [seq.params for seq in seqs]
        penalised = [i for i, p in enumerate(params) if p.has_penalty]
        # (a verification's row j comes after j drafts: j more output tokens)
        masked = [
            i
            for i, seq in enumerate(seqs)
            if seq.num_output_tokens + (len(drafted[i]) if drafted else 0) < seq.params.min_tokens
        ]
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        # Edited in place below, so copy first: raw must stay raw for logprobs (and is the caller's tensor).
        logits = raw.clone() if penalised or masked or constrained or biased else raw
        errors: dict[int, str] = {}
        if biased:
            rows = [i for i in biased for _ in params[i].logit_bias]
            cols = [t for i in biased for t in params[i].logit_bias]
            values = [v for i in biased for v in params[i].logit_bias.values()]
            rows_t, cols_t, bits = self._uploader(logits.device).upload(
                [[rows], [cols], [float_bits(values)]]
            )
            logits.index_put_((rows_t, cols_t), as_floats(bits, logits.dtype), accumulate=True)

        if constrained:
            errors.update(self._apply_grammars(logits, seqs, constrained, drafted))
        if masked:
            grammar_only = _take_rows(logits, constrained).clone() if constrained else None
            mask_min_tokens(logits, masked, seqs, self._uploader(logits.device))
            if grammar_only is not None:  # the grammar can only end here: it wins over min_tokens
                stuck = _take_rows(logits, constrained).amax(dim=-1) == float("-inf")
                if stuck.any():
                    rows = [constrained[j] for j in stuck.nonzero().flatten().tolist()]
                    _put_rows(logits, rows, grammar_only[stuck])
        penalty_rows = None
        if penalised:
            penalty_rows = self._penalty_state(logits).apply(
                logits,
                penalised,
                [seqs[i] for i in penalised],
                [drafted[i] for i in penalised] if drafted else None,
            )
        return logits, errors, penalty_rows

    def _draw(
        self, logits: torch.Tensor, seqs: list[Sequence], uniform: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of processed ``logits``, as every plain step samples (so a seeded row draws the
        same token whichever path it takes): the kernel on a GPU, ``sample_rows`` elsewhere. ``uniform``:
        the seeded rows' draws when the caller made them already (a verification's bonus rows)."""
        table = self._sampling_table(logits.shape[1])
        rows = table.rows(seqs)  # (first: it may grow the table)
        values = table.values[rows]  # [n, columns]
        if uniform is None:
            uniform = draw_uniforms(values, seqs)
        if not (self._fused_kernel and logits.is_cuda):
            return sample_rows(logits, rows_as_params(values, uniform, self._uploader(logits.device)))
        from longserve.engine.sampling_kernel import fused_sample_rows

        # One upload: the rows' table indices, seeded rows' uniforms, the step's seed and the rows written
        # since the last step, which go into the table's device mirror.
        mirror, unsynced = table.mirror(logits.device)
        row_index, uniform_bits, step_seed, written, written_values = self._uploader(logits.device).upload(
            [[rows], [uniform.view(np.int64)], [[int(torch.randint(1 << 62, ()))]], [unsynced],
             [table.values[unsynced].reshape(-1).view(np.int64)]]
        )  # fmt: skip
        if unsynced:
            mirror.index_copy_(0, written, written_values.view(torch.float64).view(len(unsynced), -1))
        return fused_sample_rows(logits, mirror, row_index, uniform_bits.view(torch.float64), step_seed)

    def _sampling_table(self, vocab: int) -> SamplingTable:
        if self._table is None or self._table.vocab != vocab:
            self._table = SamplingTable(vocab)
        return self._table

    def release(self, seq: Sequence) -> None:
        """Forget a sequence that has ended (its parameters' and penalty counts' rows are reused)."""
        if self._table is not None:
            self._table.release(seq)
        if self._penalties is not None:
            self._penalties.release(seq)

    def _penalty_state(self, logits: torch.Tensor) -> PenaltyState:
        if self._penalties is None:
            self._penalties = PenaltyState(logits.shape[1], logits.device, self._uploader(logits.device))
        return self._penalties

    def _uploader(self, device: torch.device) -> StepUploader:
        uploader = self._uploaders.get(device)
        if uploader is None:
            # Up to four uploads a step (min_tokens' indices, penalties' rows and new rows, the row
            # parameters): two steps' worth in turn, so none waits for the step just queued.
            uploader = self._uploaders[device] = StepUploader(device, depth=8)
        return uploader

    def _apply_grammars(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int], drafted: list[list[int]] | None
    ) -> dict[int, str]:
        """Mask ``rows`` of ``logits`` in place to what their grammars allow; rows whose matcher broke -> error."""
        if self._grammar_masker is None:
            self._grammar_masker = GrammarMasker()
        selected = _take_rows(logits, rows)
        prefixes = [drafted[i] for i in rows] if drafted is not None else None
        dead = self._grammar_masker.apply(selected, [seqs[i].grammar for i in rows], prefixes)
        if selected is not logits:
            _put_rows(logits, rows, selected)
        return {
            rows[j]: f"structured output failed: {seqs[rows[j]].grammar.get_error() or 'grammar error'}"
            for j in dead
        }


# Row lists are ascending and distinct, so a full-length list is every row in order: no gather/scatter copy.
def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]


def _put_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    x[slice(None) if len(rows) == x.shape[0] else torch.tensor(rows, device=x.device)] = values


def needs_host_state(seq: Sequence) -> bool:
    """Sampling this sequence reads its output tokens on the host (a grammar's matcher), so its step must be
    read back before the next one samples it. (Penalties count them on the device; min_tokens needs only
    their count, known with tokens in flight.)"""
    return seq.grammar is not None


def _needs_processing(seq: Sequence) -> bool:
    p = seq.params
    return (
        not p.greedy
        or p.logprobs is not None
        or p.has_penalty
        or bool(p.logit_bias)
        or seq.num_output_tokens < p.min_tokens
        or seq.grammar is not None
    )


def mask_min_tokens(
    logits: torch.Tensor, masked: list[int], seqs: list[Sequence], uploader: StepUploader | None = None
) -> None:
    """In place: forbid EOS and stop token ids in rows ``masked``, those whose sequence will not have produced
    ``min_tokens`` tokens before them (tokens still on the device count). ``uploader``: the indices go up
    without waiting for the device.

    ``logits`` is ``[num_seqs, vocab]``. EOS is masked even with ``ignore_eos`` (min_tokens wins).
    """
    rows, cols = [], []
    for i in masked:
        seq = seqs[i]
        for token in set(seq.eos_token_ids).union(seq.params.stop_token_ids):
            if token < logits.shape[1]:
                rows.append(i)
                cols.append(token)
    if rows:
        uploader = uploader or StepUploader(logits.device)
        rows_t, cols_t = uploader.upload([[rows], [cols]])
        logits[rows_t, cols_t] = float("-inf")
