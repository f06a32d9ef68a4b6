"""cache_aware dispatch: prompt fingerprints follow shared prefixes, the controller sends a prefix back to the
worker that last got it (unless that worker is far busier), and a conversation's turns stay on one worker."""

from __future__ import annotations

import random

import pytest
from stack import MODEL, Stack

from longserve.serve.controller import CACHE_AWARE_MAX_IMBALANCE, Controller
from longserve.serve.prefix_routing import TEXT_CHUNK_CHARS, PrefixIndex, prompt_fingerprint
from longserve.serve.worker_protocol import WorkerStatus

A, B = "http://127.0.0.1:9001", "http://127.0.0.1:9002"


def test_fingerprints_share_entries_exactly_as_far_as_prompts_share_a_prefix() -> None:
    base = "".join(chr(65 + i % 26) for i in range(5 * TEXT_CHUNK_CHARS))
    same_start = base[: 3 * TEXT_CHUNK_CHARS] + "x" * (2 * TEXT_CHUNK_CHARS)
    first, second = prompt_fingerprint(base), prompt_fingerprint(same_start)
    assert len(first) == len(second) == 5
    assert first[:3] == second[:3] and first[3] != second[3]
    assert prompt_fingerprint(base[:-1]) == first[:4]  # partial chunks are not fingerprinted
    assert prompt_fingerprint(list(range(40))) == prompt_fingerprint(list(range(32)))  # 2 blocks of 16
    assert prompt_fingerprint("short") == []


def test_index_matches_per_worker_and_forgets_departed_workers() -> None:
    index = PrefixIndex(capacity=6)
    index.record([1, 2, 3], A)
    index.record([1, 2, 7], B)  # B got the same first two chunks later: they now point at B
    assert index.matched_chunks([1, 2, 3]) == {B: 2, A: 3}
    index.forget(B)
    assert index.matched_chunks([1, 2, 3]) == {}  # the chain breaks at chunk 1
    index.record([10, 11, 12, 13, 14, 15], A)
    assert len(index) == 6 and index.matched_chunks([3]) == {}  # capacity: the oldest went first


def _controller() -> Controller:
    controller = Controller("cache_aware", heart_beat_expiration_s=30.0, rng=random.Random(0))
    for address in (A, B):
        controller.register(address, WorkerStatus(model_names=[MODEL], queue_length=0))
    return controller


def test_a_prefix_goes_back_to_its_worker_within_the_load_margin() -> None:
    controller = _controller()
    conversation = [11, 12, 13]
    first = controller.get_worker_address(MODEL, fingerprint=conversation)
    other = B if first == A else A
    # The next turn repeats the history and adds to it: it goes where the history went, though that worker
    # now has the longer queue.
    assert controller.get_worker_address(MODEL, fingerprint=[*conversation, 14]) == first
    # Another conversation, with nothing cached anywhere, goes to the shortest queue.
    assert controller.get_worker_address(MODEL, fingerprint=[21, 22]) == other
    # Too busy: past the margin the prefix is given up for the shortest queue.
    controller._workers[first].status.queue_length = int(CACHE_AWARE_MAX_IMBALANCE) + 5
    controller._workers[other].status.queue_length = 0
    assert controller.get_worker_address(MODEL, fingerprint=[*conversation, 14, 15]) == other
    # Without a fingerprint (a chat-template call) it is plain shortest-queue dispatch.
    assert controller.get_worker_address(MODEL) == other


@pytest.fixture(scope="module")
def cache_aware_stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 2, dispatch_method="cache_aware") as stack:
        yield stack


def test_turns_of_a_conversation_land_on_one_worker(cache_aware_stack) -> None:
    stack = cache_aware_stack
    # (the tiny model's byte-level tokenizer makes ~180 tokens of this; its whole context is 512)
    histories = {
        c: [{"role": "system", "content": f"System prompt {c}: " + "be brief. " * 20}] for c in range(4)
    }
    placements: dict[int, set[int]] = {c: set() for c in histories}
    for turn in range(3):
        for conversation, messages in histories.items():
            messages.append({"role": "user", "content": f"turn {turn} of conversation {conversation}"})
            before = list(stack.added)
            out = stack.client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, temperature=0
            )
            messages.append({"role": "assistant", "content": out.choices[0].message.content})
            grew = [i for i, (a, b) in enumerate(zip(stack.added, before, strict=True)) if a > b]
            assert len(grew) == 1
            placements[conversation].add(grew[0])
    assert all(len(workers) == 1 for workers in placements.values()), placements
    # (Where a new conversation starts is shortest-queue with random ties, as the unit test above checks; the
    # chat-template calls count as dispatches too, so both workers are not always used here.)
