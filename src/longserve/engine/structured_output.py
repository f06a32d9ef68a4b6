"""Structured output: grammars compiled off the engine thread into llguidance matchers, and their token masks.

A request's ``StructuredOutputParams`` becomes an llguidance grammar (``grammar_definition``), compiled once per
distinct grammar by ``GrammarCompiler`` on its own thread (a compile drops the GIL; a cached grammar is a deep
copy away), so a slow schema never stalls an engine step. Each constrained sequence owns a matcher; every step
``GrammarMasker`` fills one bitmask row per constrained row (llguidance's parallel executor) and turns
disallowed tokens' logits to -inf. The engine advances the matcher with each accepted token and ends the
sequence when the grammar is complete. Preemption recomputes the KV cache but keeps the output tokens, so the
matcher stays in step and never needs a rollback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import llguidance
import torch
from llguidance import LLMatcher, LLTokenizer

from longserve.engine.grammar_spec import grammar_definition
from longserve.engine.sampling_params import StructuredOutputParams

log = logging.getLogger(__name__)

# Distinct grammars kept compiled; a service sees few schemas many times (tools, one app's response format).
_CACHE_SIZE = 256


class GrammarCompiler:
    """Compiles grammars on one background thread and caches them; ``compile`` returns a matcher's future.

    The llguidance tokenizer (every token's bytes, ~0.4 s to build for a 50k vocabulary) is built on that
    thread too, the first time a constrained request arrives.
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer  # longserve.loading.tokenizer.Tokenizer
        self._vocab_size = (
            vocab_size  # logits width: the model's embedding rows, maybe more than the tokenizer's
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compiler")
        self._lltokenizer: LLTokenizer | None = None
        self._cache: OrderedDict[str, LLMatcher] = OrderedDict()  # grammar definition -> a pristine matcher
        self._lock = threading.Lock()
        self.compile_seconds: dict[str, float] = {}  # kind -> total compile time, for the benchmark

    def compile(self, spec: StructuredOutputParams) -> Future[LLMatcher]:
        """A fresh matcher for ``spec``; the future raises ``ValueError`` naming the field if it is invalid."""
        with self._lock:
            try:
                definition = grammar_definition(spec)
            except ValueError as exc:
                return _failed(exc)
            cached = self._cache.get(definition)
            if cached is not None:
                self._cache.move_to_end(definition)
                return _done(cached.deep_copy())
        return self._executor.submit(self._compile, spec.kind, definition)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile(self, kind: str, definition: str) -> LLMatcher:
        start = time.perf_counter()
        if self._lltokenizer is None:
            self._lltokenizer = LLTokenizer(
                self._tokenizer.backend.to_str(),
                n_vocab=self._vocab_size,
                eos_token=sorted(self._tokenizer.eos_token_ids),
            )
        matcher = LLMatcher(self._lltokenizer, definition, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{kind}: {matcher.get_error()}")
        elapsed = time.perf_counter() - start
        self.compile_seconds[kind] = self.compile_seconds.get(kind, 0.0) + elapsed
        log.debug("compiled a %s grammar in %.1f ms", kind, elapsed * 1e3)
        with self._lock:
            self._cache[definition] = matcher
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return matcher.deep_copy()


class GrammarWaitlist:
    """Constrained requests whose grammar is still compiling; the engine schedules them once it is ready."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self._compiler = compiler
        self._waiting: dict[str, tuple[object, Future[LLMatcher]]] = {}  # request id -> (Request, future)

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def add(self, request) -> None:
        """Start compiling ``request``'s grammar (``request.params.structured_output`` must be set)."""
        self._waiting[request.request_id] = (
            request,
            self._compiler.compile(request.params.structured_output),
        )

    def remove(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def pop_ready(self, wait_s: float = 0.0) -> list[tuple[object, LLMatcher | Exception]]:
        """Requests whose compile ended, each with its matcher or the error; waits up to ``wait_s`` for one."""
        if wait_s > 0 and self._waiting:
            wait([f for _, f in self._waiting.values()], timeout=wait_s, return_when=FIRST_COMPLETED)
        done = [rid for rid, (_, future) in self._waiting.items() if future.done()]
        ready = []
        for rid in done:
            request, future = self._waiting.pop(rid)
            error = future.exception()
            ready.append((request, error if error is not None else future.result()))
        return ready


class GrammarMasker:
    """Per step: one bitmask row per constrained sequence, applied to that row's logits."""

    def __init__(self) -> None:
        self._executor = llguidance.LLExecutor()
        # byte value -> its 8 bits, lowest first: token 8*b + j is allowed iff bit j of mask byte b is set.
        self._bits = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [256, 8]

    def apply(
        self, logits: torch.Tensor, matchers: list[LLMatcher], drafted: list[list[int]] | None = None
    ) -> list[int]:
        """Set disallowed tokens of row i of ``logits`` ``[len(matchers), vocab]`` to -inf, in place.

        ``drafted[i]``: tokens row i's matcher is taken past first (a speculative verification's row after
        those drafts; they must be valid), and back after. Returns the rows whose grammar allows nothing (a
        matcher in its error state); they are left as is.
        """
        # Imported at first use: it pulls in torch._dynamo, a second or more of every engine's start-up.
        import llguidance.torch

        rows, vocab = logits.shape
        bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)  # [rows, ceil(vocab / 32)] int32
        drafted = drafted or [[] for _ in matchers]
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers) if not drafted[i]], bitmask
        )
        for i, tokens in enumerate(drafted):
            if tokens:  # the same matcher at another state: one row at a time
                if not matchers[i].consume_tokens(tokens):
                    raise ValueError(f"structured output: drafts {tokens} were not valid for the grammar")
                llguidance.torch.fill_next_token_bitmask(matchers[i], bitmask, i)
                matchers[i].rollback(len(tokens))
        allowed = self._bits[bitmask.view(torch.uint8).long()].view(rows, -1)[:, :vocab]  # [rows, vocab]
        dead = [i for i in range(rows) if matchers[i].is_error()]
        if dead:
            allowed[dead] = True
        logits.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))
        return dead


def _done(matcher: LLMatcher) -> Future[LLMatcher]:
    future: Future[LLMatcher] = Future()
    future.set_result(matcher)
    return future


def _failed(exc: Exception) -> Future[LLMatcher]:
    future: Future[LLMatcher] = Future()
    future.set_exception(exc)
    return future
