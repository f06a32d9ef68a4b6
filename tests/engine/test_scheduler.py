"""Scheduler: the per-step token budget bounds prompt work, running decodes run every step, long prompts chunk.

Most tests drive the scheduler alone (block manager + sequences, no model): each simulated step advances the
scheduled counts and appends a token where a sequence completes, as LLMEngine.step does.
"""

from __future__ import annotations

import random

import pytest
from engine_steps import engine_request

from longserve import LLM, SamplingParams
from longserve.config import EngineConfig
from longserve.engine.kv_cache import BlockManager
from longserve.engine.scheduler import Scheduler, SchedulerOutput
from longserve.engine.sequence import FinishReason, Sequence

BLOCK = 16


def _seq(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompt = list(range(prompt_len))
    return Sequence(name, 0, prompt, params, frozenset(), max_total_tokens=prompt_len + max_tokens)


def _advance(scheduler: Scheduler, plan: SchedulerOutput) -> None:
    """What the engine does after the forward pass: count computed tokens, sample where a sequence completes."""
    for item in plan.scheduled:
        completes = item.completes_sequence  # judged before the counts move, as the model runner does
        item.seq.num_computed_tokens += item.num_new_tokens
        if completes:
            item.seq.output_token_ids.append(7)
            if item.seq.num_tokens >= item.seq.max_total_tokens:
                scheduler.finish(item.seq, FinishReason.LENGTH)


def _decoding(scheduler: Scheduler) -> list[Sequence]:
    return [s for s in scheduler.running if s.num_computed_tokens > 0 and s.num_uncomputed_tokens == 1]


def _check_step(scheduler: Scheduler, budget: int) -> tuple[SchedulerOutput, int]:
    """One step, checked: within budget, every running decode scheduled first. Returns (plan, prompt tokens)."""
    decoding = _decoding(scheduler)
    plan = scheduler.schedule()
    assert plan.num_tokens <= budget
    kinds = [item.is_decode for item in plan.scheduled]
    assert kinds == sorted(kinds, reverse=True), "decodes come before prompt chunks"
    scheduled = {id(item.seq): item for item in plan.scheduled}
    preempted = {id(seq) for seq in plan.preempted}
    for seq in decoding:  # a running decode is never starved by prompt work, only pushed out by a full cache
        assert id(seq) in scheduled or id(seq) in preempted
        if id(seq) in scheduled:
            assert scheduled[id(seq)].num_new_tokens == 1
    prompt_tokens = sum(item.num_new_tokens for item in plan.scheduled if not item.is_decode)
    assert prompt_tokens <= budget - sum(kinds)
    return plan, prompt_tokens


def test_a_long_prompt_is_chunked_while_every_running_stream_decodes_each_step() -> None:
    budget = 64
    scheduler = Scheduler(BlockManager(200, BLOCK), budget, max_num_seqs=8)
    streams = [_seq(f"d{i}", 20, 100) for i in range(6)]
    for seq in streams:
        scheduler.add(seq)
    _advance(scheduler, scheduler.schedule())  # the six short prompts: 120 tokens, two steps
    _advance(scheduler, scheduler.schedule())
    assert len(_decoding(scheduler)) == 6

    long_prompt = _seq("long", 500, 4)
    scheduler.add(long_prompt)
    chunks = []
    while long_prompt.num_computed_tokens < 500:
        outputs_before = [len(s.output_token_ids) for s in streams]
        plan, prompt_tokens = _check_step(scheduler, budget)
        chunks.append(prompt_tokens)
        _advance(scheduler, plan)
        assert [len(s.output_token_ids) for s in streams] == [n + 1 for n in outputs_before]
    # 58 prompt tokens per step (64 less the six decodes); only the last chunk samples the first token
    assert chunks == [58] * 8 + [36]
    assert long_prompt.output_token_ids == [7]


@pytest.mark.parametrize("num_blocks", [400, 60], ids=["roomy-cache", "cache-forces-preemption"])
def test_budget_and_decode_first_hold_under_random_load(num_blocks: int) -> None:
    rng = random.Random(num_blocks)
    budget = 48
    manager = BlockManager(num_blocks, BLOCK)
    scheduler = Scheduler(manager, budget, max_num_seqs=16)
    pending = [_seq(f"r{i}", rng.randint(1, 300), rng.randint(1, 40)) for i in range(80)]
    everyone = list(pending)
    steps = prompt_steps_with_decodes = 0
    while pending or scheduler.num_unfinished:
        if pending and rng.random() < 0.3:  # requests keep arriving while others run
            scheduler.add(pending.pop())
        plan, prompt_tokens = _check_step(scheduler, budget)
        decodes = sum(item.is_decode for item in plan.scheduled)
        prompt_steps_with_decodes += bool(prompt_tokens and decodes)
        _advance(scheduler, plan)
        steps += 1
        assert steps < 20_000
    assert all(seq.finish_reason is FinishReason.LENGTH for seq in everyone)
    assert all(len(seq.output_token_ids) == seq.params.max_tokens for seq in everyone)
    assert manager.num_free_blocks == manager.num_usable_blocks
    assert prompt_steps_with_decodes > 50  # prompts really were admitted alongside running streams
    if num_blocks == 60:
        assert sum(seq.num_preemptions for seq in everyone) > 0


def test_default_budget_is_chosen_by_device() -> None:
    config = EngineConfig()
    assert config.max_num_batched_tokens is None
    assert config.resolved("cpu").max_num_batched_tokens == 512
    assert config.resolved("cuda").max_num_batched_tokens == 8192
    # never below max_num_seqs: every running sequence's decode fits in one step
    assert EngineConfig(max_num_seqs=600).resolved("cpu").max_num_batched_tokens == 600
    assert EngineConfig(max_num_batched_tokens=96).resolved("cuda").max_num_batched_tokens == 96


def test_budget_below_max_num_seqs_or_not_positive_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match="max_num_batched_tokens \\(32\\) must be at least max_num_seqs \\(64\\)"
    ):
        EngineConfig(max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer"):
        EngineConfig(max_num_batched_tokens=0, max_num_seqs=1)
    monkeypatch.setenv("LONGSERVE_MAX_NUM_BATCHED_TOKENS", "768")
    assert EngineConfig.from_env().max_num_batched_tokens == 768


def test_engine_streams_every_step_while_a_long_prompt_prefills(tiny_llama_dir: str) -> None:
    assert LLM(tiny_llama_dir, kv_cache_memory_mb=4).engine.scheduler.max_num_batched_tokens == 512
    llm = LLM(tiny_llama_dir, kv_cache_memory_mb=4, max_num_batched_tokens=16, max_num_seqs=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(3):
        engine.add_request(engine_request(engine, f"s{i}", [5 + i, 6, 7, 8], params))
    while len(_decoding(engine.scheduler)) < 3:
        engine.step()
    engine.add_request(engine_request(engine, "long", list(range(3, 103)), SamplingParams(max_tokens=2)))
    prefill_steps = 0
    while True:
        outputs = engine.step()
        # every step hands each running stream exactly one new token
        assert sorted(o.request_id for o in outputs if o.request_id != "long") == ["s0", "s1", "s2"]
        assert all(len(o.seqs[0].token_ids) == 1 for o in outputs)
        if any(o.request_id == "long" for o in outputs):
            break
        prefill_steps += 1
    assert prefill_steps == 100 // 13  # 13 prompt tokens per step beside three decodes; the 8th step samples
    while engine.has_unfinished():
        engine.step()
