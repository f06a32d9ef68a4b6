"""Draft proposers on hand-made histories: prompt lookup takes the longest tail n-gram's latest occurrence;
suffix drafts follow the majority continuation of the longest match, in the sequence or in recent outputs."""

from longserve.config import SpeculativeConfig
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence, SequenceStatus
from longserve.engine.spec_decode.ngram import NgramProposer
from longserve.engine.spec_decode.speculator import Speculator
from longserve.engine.spec_decode.suffix import SuffixProposer


def _seq(prompt: list[int], output: list[int] = (), **params) -> Sequence:
    seq = Sequence("r", 0, list(prompt), SamplingParams(temperature=0, **params), frozenset(), 1000)
    seq.output_token_ids = list(output)
    return seq


def test_prompt_lookup_prefers_the_longest_ngram_then_the_latest_occurrence():
    proposer = NgramProposer(1, 3)
    # "7 8" occurs twice (followed by 1 then by 2); "6 7 8" once, followed by 3 4.
    seq = _seq([6, 7, 8, 3, 4, 5, 7, 8, 1, 9, 7, 8, 2, 0, 6, 7, 8])
    assert proposer.draft(seq, 2) == [3, 4]
    seq = _seq([5, 7, 8, 1, 9, 7, 8, 2, 0, 7, 8])
    assert NgramProposer(1, 3).draft(seq, 3) == [2, 0, 7]


def test_prompt_lookup_follows_the_output_as_it_grows():
    proposer = NgramProposer(2, 2)
    seq = _seq([1, 2, 3, 4], [9])
    assert proposer.draft(seq, 4) == []
    seq.output_token_ids += [1, 2]
    assert proposer.draft(seq, 4) == [3, 4, 9, 1]  # up to the known end
    seq.output_token_ids += [5, 1, 2]
    assert proposer.draft(seq, 1) == [5]  # the latest occurrence of "1 2" now


def test_suffix_drafts_take_the_majority_continuation_of_the_longest_match():
    # The tail "3 4 5" occurred twice (so did "4 5", once more, followed by 9): both times followed by 6, then
    # by 7 or 8 (each 1/2: a tie goes to the latest), then 2.
    tokens = [3, 4, 5, 6, 7, 1, 3, 4, 5, 6, 8, 2, 4, 5, 9, 0, 3, 4, 5]
    assert SuffixProposer(16, 10, min_token_prob=0.6).draft(_seq(tokens), 3) == [6]
    assert SuffixProposer(16, 10, min_token_prob=0.3).draft(_seq(tokens), 3) == [6, 8, 2]
    # Three of four "1 2" go on with 3 (no longer match: each follows another token): an estimate of 3/4.
    votes = [5, 1, 2, 3, 6, 1, 2, 3, 7, 1, 2, 4, 8, 1, 2, 3, 9, 1, 2]
    assert SuffixProposer(16, 10, min_token_prob=0.7).draft(_seq(votes), 1) == [3]
    assert SuffixProposer(16, 10, min_token_prob=0.8).draft(_seq(votes), 1) == []


def test_suffix_drafts_come_from_earlier_requests_outputs():
    proposer = SuffixProposer(max_depth=16, max_cached_requests=1, min_token_prob=0.5)
    done = _seq([1], [40, 41, 42, 43, 44])
    proposer.finish(done)
    seq = _seq([7, 8, 40, 41])
    assert proposer.draft(seq, 3) == [42, 43, 44]
    proposer.finish(_seq([1], [50, 51, 52]))  # evicts the first output (one cached request)
    assert proposer.draft(_seq([9, 40, 41]), 3) == []


def test_drafts_adapt_to_acceptance_and_pause_after_failures():
    config = SpeculativeConfig("ngram", num_speculative_tokens=6, prompt_lookup_min=1)
    spec = Speculator(config, NgramProposer(1, 4))
    seq = _seq(list(range(10)) * 3, [0])
    seq.status, seq.num_computed_tokens = SequenceStatus.RUNNING, seq.num_tokens - 1
    spec.propose([seq])
    assert seq.draft_token_ids == [1, 2, 3, 4, 5, 6]
    spec.record(seq, 6, 2)
    spec.propose([seq])
    assert len(seq.draft_token_ids) == 5  # one fewer after a partial run
    for _ in range(3):
        spec.record(seq, 5, 0)
    spec.propose([seq])
    assert seq.draft_token_ids == []  # paused after repeated failures
    assert spec.stats.num_drafts == 4 and spec.stats.accepted_per_position[:3] == [1, 1, 0]
    pending = _seq(list(range(10)) * 3, [0])
    pending.status, pending.num_computed_tokens, pending.num_pending_tokens = SequenceStatus.RUNNING, 30, 1
    spec.propose([pending])
    assert pending.draft_token_ids == []  # its last token is still on the device
