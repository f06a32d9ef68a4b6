"""LLMEngine: requests in, one scheduler step -> forward -> sample per ``step()``, token deltas out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import msgspec
import torch

from longserve.config import EngineConfig
from longserve.distributed.launch import RankDiedError
from longserve.engine.embeddings import Embedder
from longserve.engine.kv_cache import BlockManager
from longserve.engine.model_loading import (
    allocate_caches,
    build_graphs,
    build_lora,
    load_model,
    model_max_len,
)
from longserve.engine.model_runner import ModelRunner
from longserve.engine.protocol import (
    EngineRequest,
    EngineStats,
    RequestDelta,
    RequestLimits,
)
from longserve.engine.request import Request, build_request
from longserve.engine.sampled_rows import SampledRows
from longserve.engine.sampler import Sampler, needs_host_state
from longserve.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from longserve.engine.sequence import FinishReason, GrammarRejected, Sequence, SequenceStatus
from longserve.engine.spec_decode.speculator import build_speculator
from longserve.engine.structured_output import GrammarCompiler, GrammarWaitlist
from longserve.engine.tensor_parallel import start_ranks

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step queued on the device: read back at once, or one step later when it overlaps the next."""

    scheduled: list[ScheduledSequence]
    starts: list[int]  # each scheduled sequence's computed tokens before the step
    prompt_logits: dict[int, torch.Tensor]  # scheduled index -> [chunk_tokens, vocab]
    sampled_seqs: list[Sequence]  # row-aligned with ``sampled``
    sampled: SampledRows | None
    overlap: bool
    num_drafts: list[int] | None  # row-aligned with ``sampled``: the drafts each one verified (None: none)


class LLMEngine:
    """Synchronous engine. Not thread-safe: the engine core loop (``core_process``) or ``LLM`` drives it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {config.device!r}: CUDA is not available in this torch build or machine"
            )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # With tensor parallelism this process is rank 0: it starts the other ranks, which load their shards
        # meanwhile, and leads every step (tensor_parallel.py).
        self.ranks = start_ranks(config)
        self.device = self.ranks.device
        try:
            loaded = load_model(config, self.device, self.ranks.tp)
            # A draft model and its cache come first: on a GPU the target's cache takes what is left.
            self.speculator = (
                build_speculator(config, loaded, model_max_len(config, loaded.model_config))
                if config.speculative_config is not None and loaded.family.can_generate
                else None
            )
            num_blocks, caches = allocate_caches(config, loaded, self.device, self.ranks.tp)
        except (ValueError, RuntimeError, OSError) as exc:
            self.ranks.report_loaded(f"{type(exc).__name__}: {exc}")
            raise
        self.ranks.report_loaded()
        self.quantization = loaded.quantization  # what the matmuls run: None (exact fp32), "int8" or "gguf"
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.model_config = loaded.model_config
        self.can_generate = loaded.family.can_generate  # False: embedding-only; generating raises ValueError
        self.is_encoder = loaded.family.encoder  # embedded by model.encode(), without the paged KV cache
        self.pooling = loaded.pooling  # how embed() pools hidden states
        self.model = loaded.model
        # By-device defaults (the per-step token budget) follow where the weights ended up.
        config = self.config = config.resolved(self.device.type)
        self.model_name = config.model or "SmolLM2-135M-Instruct"

        mc = self.model_config
        self.max_model_len = model_max_len(config, mc)
        self.cache_capacity = self.max_model_len if self.is_encoder else (num_blocks - 1) * config.block_size
        if not self.is_encoder:
            log.info(
                "KV cache: %d tokens (%d blocks of %d), %.1f sequences of the full %d-token context",
                self.cache_capacity, num_blocks - 1, config.block_size,
                self.cache_capacity / self.max_model_len, self.max_model_len,
            )  # fmt: skip
            if self.cache_capacity < self.max_model_len:  # requests get 400s past it: say why at start
                log.warning(
                    "the KV cache holds %d tokens, less than one sequence of the %d-token context: longer "
                    "requests are refused (raise --gpu-memory-utilization or --kv-cache-memory-mb, lower "
                    "--max-model-len, or free the device's memory)",
                    self.cache_capacity, self.max_model_len,
                )  # fmt: skip
        self.block_manager = BlockManager(
            num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            # MoBA keeps one mean key per MoBA block in the cache block holding its first token, so only
            # whole MoBA blocks are shared.
            match_granularity=config.moba_chunk_size // config.block_size
            if config.attention == "moba"
            else 1,
        )
        self.lora = build_lora(config, loaded, self.device, self.ranks.tp)  # None: no adapters served
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_batched_tokens, config.max_num_seqs, self.lora
        )
        graphs = build_graphs(config, loaded, caches, self.device, self.ranks.tp, self.max_model_len)
        self.runner = ModelRunner(
            self.model, caches, config.block_size, self.device, graphs, max_context=self.max_model_len,
            ranks=self.ranks, lora_rows=self.lora.slots.rows if self.lora is not None else None,
            block_tables=self.block_manager.tables,
        )  # fmt: skip
        self.runner.keep_hidden = self.speculator is not None and self.speculator.proposer.needs_hidden_states
        self.sampler = Sampler()
        self.embedder = Embedder(
            self.runner, self.block_manager, self.model, self.pooling, self.is_encoder,
            vocab_size=mc.vocab_size, max_tokens=min(self.max_model_len, self.cache_capacity),
            step_tokens=config.max_num_batched_tokens,
        )  # fmt: skip
        self.grammars = GrammarWaitlist(GrammarCompiler(self.tokenizer, self.model_config.vocab_size))
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestDelta] = []  # aborts, reported at the next step
        # Overlapped steps (vLLM's async scheduling): on a GPU the host prepares step N+1 while step N runs.
        # With tensor parallelism the other ranks would need the tokens sampled on rank 0 (not built).
        self.overlap_steps = config.overlaps_steps(self.device.type) and not self.ranks.tp.is_parallel
        if self.speculator is not None:
            self.speculator.pause_on_miss = self.overlap_steps
        self._in_flight: LaunchedStep | None = None  # launched, not yet read back

    # ---- requests -------------------------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        """What a request may ask of this engine (also handed to the engine core's clients)."""
        return RequestLimits(
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            cache_capacity=self.cache_capacity,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids),
            can_generate=self.can_generate,
            embedding_size=self.model_config.hidden_size,
            pooling=self.pooling,
        )

    def add_request(self, engine_request: EngineRequest) -> None:
        """Queue a request; one the engine cannot run (or a duplicate id) raises ``ValueError``."""
        if engine_request.request_id in self.requests:
            raise ValueError(f"request_id {engine_request.request_id!r} is already running")
        request = build_request(self.limits, engine_request)
        self.scheduler.check_fits(request.seqs[0])  # (before its adapter is held: nothing to undo)
        if engine_request.lora_name is not None:
            if self.lora is None:
                raise ValueError(f"model {engine_request.lora_name!r}: this engine serves no LoRA adapters")
            for seq in request.seqs:
                seq.lora_id = self.lora.hold(engine_request.lora_name)  # LoRAError (a ValueError) if unknown
        if request.params.structured_output is not None:
            self.grammars.add(request)  # scheduled by step() once its grammar has compiled
        else:
            for seq in request.seqs:
                self.scheduler.add(seq)
        self.requests[request.request_id] = request

    def add_lora(self, name: str, path: str) -> None:
        """Serve LoRA adapter ``name`` from PEFT directory ``path``; ``LoRAError`` (a ValueError) if it
        cannot be served here or the name is taken. Running requests are not disturbed."""
        if self.lora is None:
            raise ValueError("this engine was started without LoRA (enable_lora)")
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` to new requests (running ones finish on it)."""
        if self.lora is None:
            raise ValueError("this engine was started without LoRA (enable_lora)")
        self.lora.remove(name)

    @property
    def lora_names(self) -> list[str]:
        return self.lora.names if self.lora is not None else []

    def abort(self, request_id: str, seq_index: int | None = None) -> None:
        """Stop a request (or one of its completions) now; its blocks are free at once and its last delta
        follows at the next step."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if (seq_index is None or seq.seq_index == seq_index) and not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        if request.finished:
            del self.requests[request_id]
            self.grammars.remove(request_id)
        self._pending.append(request.take_delta())

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV cache usage and prefix cache counters."""
        blocks = self.block_manager
        spec = self.speculator.stats if self.speculator is not None else None
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting) + len(self.grammars),
            blocks.usage,
            blocks.prefix_queries,
            blocks.prefix_hits,
            spec_decode=msgspec.structs.replace(spec, accepted_per_position=list(spec.accepted_per_position))
            if spec is not None
            else None,
            **(
                self.lora.stats(self.scheduler.running, self.scheduler.waiting)
                if self.lora is not None
                else {}
            ),
        )

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one device)."""
        self.ranks.close()

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending) or self._in_flight is not None

    # ---- embeddings -----------------------------------------------------------------------------------------

    def embed_batch(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings of each input (``Embedder``); call between steps on the engine's thread."""
        return self.embedder.embed_batch(token_lists)

    def embed(self, token_ids: list[int]) -> list[float]:
        return self.embedder.embed(token_ids)

    # ---- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """One scheduler step -> forward -> sample; the deltas of every request it advanced.

        Overlapped (``async_scheduling``): the step is queued on the device and this call returns the deltas
        of the step before it, which the device finished meanwhile; the host schedules and prepares while the
        device computes. Sequences still waiting for their last token take it on the device. A step that
        needs its tokens on the host before the next one can be sampled (a grammar's matcher, prompt logprobs)
        is read back at once.

        Failures stay with the request they belong to: a sampling or grammar error ends that request with
        ``error`` set and the rest of the batch goes on. Only a failed forward pass fails several requests,
        those scheduled in this step (their KV cache is suspect); requests not in the step keep running.
        """
        outputs, self._pending = self._pending, []
        self._schedule_compiled_grammars(outputs)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        launched = None if plan.is_empty else self._launch(plan, outputs)
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            outputs += self._collect(previous)
        if launched is not None:
            if launched.overlap:
                self._in_flight = launched
            else:
                outputs += self._collect(launched)
        return outputs

    def _launch(self, plan: SchedulerOutput, outputs: list[RequestDelta]) -> LaunchedStep | None:
        """Queue the step's forward and sampling; the scheduled sequences count their tokens as computed and
        each sampled one gets a token pending on the device. None if the forward failed (its requests fail)."""
        scheduled = plan.scheduled
        previous = self._in_flight
        fed = previous.sampled.token_ids if previous is not None and previous.sampled is not None else None
        starts = [item.seq.num_computed_tokens for item in scheduled]
        try:
            result = self.runner.execute(scheduled, fed)
            if result.hidden is not None:
                self.speculator.observe(scheduled, result.hidden)
            seqs = [scheduled[i].seq for i in result.sample_index]
            drafts = None
            if self.speculator is not None:
                drafts = [scheduled[i].draft_token_ids for i in result.sample_index]
            if drafts is not None and any(drafts):
                sampled = self.sampler.verify(result.sample_logits, seqs, drafts)
            else:
                drafts = None
                sampled = self.sampler.sample(result.sample_logits, seqs) if seqs else None
        except RankDiedError:
            raise  # no step can run any more: the engine's owner fails every request and stops it
        except Exception as exc:  # reported to each request and logged with its traceback, never swallowed
            log.exception("forward pass failed; failing the %d sequences of this step", len(scheduled))
            for item in scheduled:
                request = self.requests.get(item.seq.request_id)
                if request is not None:
                    outputs.append(self._fail(request, f"forward pass failed: {exc!r}"))
            return None
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        if self.speculator is not None:
            for item in scheduled:
                item.seq.draft_token_ids = []
        for row, seq in enumerate(seqs):
            seq.num_pending_tokens += 1
            seq.pending_row = row
        overlap = (
            self.overlap_steps
            and not result.prompt_logits
            and not any(needs_host_state(seq) for seq in seqs)
            # a verification's accepted count decides the next step's positions; a sequence about to draft
            # needs its last token on the host
            and (self.speculator is None or (drafts is None and not self.speculator.drafts_next(seqs)))
        )
        if sampled is not None and overlap:
            sampled.start_copy()
        num_drafts = [len(d) for d in drafts] if drafts is not None else None
        return LaunchedStep(scheduled, starts, result.prompt_logits, seqs, sampled, overlap, num_drafts)

    def _collect(self, step: LaunchedStep) -> list[RequestDelta]:
        """Read a launched step's tokens back (waiting for the device) and hand them to their requests."""
        outputs: list[RequestDelta] = []
        for index, logits in step.prompt_logits.items():
            item = step.scheduled[index]
            self._guarded(
                item.seq, outputs, self.sampler.record_prompt_logprobs, item.seq, logits, step.starts[index]
            )
        blocks = self.block_manager
        if blocks.enable_prefix_caching:
            size = blocks.block_size
            for item in step.scheduled:
                seq = item.seq  # (a block may have filled only if the computed tokens passed its end)
                if seq.num_computed_tokens >= (len(seq.block_keys) + 1) * size and not seq.is_finished:
                    blocks.cache_computed(seq)
        touched: dict[str, Request] = {}
        sampled = step.sampled.to_host() if step.sampled is not None else None
        requests, finish, num_drafts = self.requests, self._finish, step.num_drafts
        for row, seq in enumerate(step.sampled_seqs):
            seq.num_pending_tokens -= 1
            if seq.status is SequenceStatus.FINISHED:  # failed, aborted or ended meanwhile: the token is moot
                continue
            request = requests[seq.request_id]  # (a request leaves only once all its sequences finished)
            if sampled.errors and row in sampled.errors:
                # A matcher in its error state: the request's grammar cannot go on (not the engine's fault).
                grammar_broke = seq.grammar is not None and seq.grammar.is_error()
                outputs.append(self._fail(request, sampled.errors[row], client_error=grammar_broke))
                continue
            token, logprob = sampled.token_ids[row], sampled.logprobs[row]
            try:
                if num_drafts is not None and num_drafts[row]:
                    accepted = sampled.accepted.get(row, [])
                    append = partial(self._append_token, seq)
                    self.speculator.emit(seq, accepted, num_drafts[row], token, logprob, append, blocks)
                else:
                    reason = seq.append_token(token, logprob)
                    if reason is not None:
                        finish(seq, reason)
            except Exception as exc:  # this request fails; the rest of the step goes on
                self._row_failed(seq, outputs, exc)
                continue
            touched[seq.request_id] = request
        for request in touched.values():
            if request.request_id not in requests:
                continue  # failed after an earlier row touched it
            delta = request.take_delta()
            outputs.append(delta)
            if delta.finished:
                del requests[request.request_id]
        return outputs

    def fail_all(self, error: str) -> list[RequestDelta]:
        """End every request with ``error`` (a step failed outside any one request's part): their last deltas."""
        pending, self._pending = self._pending, []
        self._in_flight = None
        return pending + [self._fail(request, error) for request in list(self.requests.values())]

    def _schedule_compiled_grammars(self, outputs: list[RequestDelta]) -> None:
        """Queue the requests whose grammar compiled (one matcher per sequence); fail those whose did not.

        With nothing else to run it waits a little for a compile instead of letting the caller spin.
        """
        idle = not self.scheduler.num_unfinished
        for request, result in self.grammars.pop_ready(wait_s=0.01 if idle else 0.0):
            if isinstance(result, Exception):
                outputs.append(self._fail(request, f"structured output: {result}", client_error=True))
                continue
            for seq in request.seqs:
                seq.grammar = result if seq.seq_index == 0 else result.deep_copy()
                self.scheduler.add(seq)

    def _guarded(self, seq: Sequence, outputs: list[RequestDelta], work, *args) -> bool:
        """``work(*args)`` for one sequence; if it raises, that request fails (logged) and False comes back."""
        try:
            work(*args)
            return True
        except Exception as exc:
            self._row_failed(seq, outputs, exc)
            return False

    def _row_failed(self, seq: Sequence, outputs: list[RequestDelta], exc: Exception) -> None:
        """Fail ``seq``'s request because processing its step output raised ``exc`` (logged); the others go on."""
        if isinstance(exc, GrammarRejected):  # the grammar's own mask and parser disagree: it cannot go on
            log.warning("request %s: %s", seq.request_id, exc)
            error, client_error = str(exc), True
        else:  # a bug in one request's post-processing must not end the others
            log.error("request %s failed while processing its step output", seq.request_id, exc_info=exc)
            error, client_error = f"{type(exc).__name__}: {exc}", False
        request = self.requests.get(seq.request_id)
        if request is not None:
            outputs.append(self._fail(request, error, client_error=client_error))

    def _fail(self, request: Request, error: str, client_error: bool = False) -> RequestDelta:
        """End ``request`` now with ``error`` (``client_error``: the request's own doing, e.g. its grammar):
        its blocks are freed; the returned delta is its last."""
        self.requests.pop(request.request_id, None)
        self.grammars.remove(request.request_id)
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        delta = request.take_delta()
        delta.error, delta.client_error = error, client_error
        return delta

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence: its blocks go back, and the sampler forgets it."""
        if seq.lora_id and not seq.is_finished:
            self.lora.unhold(seq.lora_id)
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq)
        if self.speculator is not None:
            self.speculator.finish(seq)

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        reason = seq.append_token(token, logprob)
        if reason is not None:
            self._finish(seq, reason)
