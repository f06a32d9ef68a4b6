"""Sampler: each logits-processing step on crafted logits, sampling distributions, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from longserve.engine.penalties import apply_penalties, token_rows
from longserve.engine.sampler import Sampler
from longserve.engine.sampling_ops import apply_min_p, apply_top_k_top_p, greedy_argmax
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence

EOS = 0


def make_seq(
    prompt: list[int] | None = None, output: list[int] | None = None, seq_index: int = 0, **params
) -> Sequence:
    return Sequence(
        request_id="req",
        seq_index=seq_index,
        prompt_token_ids=list(prompt if prompt is not None else [5, 6, 7]),
        params=SamplingParams(max_tokens=None, **params),
        eos_token_ids=frozenset({EOS}),
        max_total_tokens=10_000,
        output_token_ids=list(output or []),
    )


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)  # [1, vocab]


def sample_support(logits: torch.Tensor, num_samples: int = 4000, **params) -> dict[int, int]:
    """Histogram of tokens from ``num_samples`` rows sharing the same logits and params."""
    torch.manual_seed(1234)
    seqs = [make_seq(**params) for _ in range(num_samples)]
    out = Sampler()(logits.expand(num_samples, -1).contiguous(), seqs)
    hist: dict[int, int] = {}
    for t in out.token_ids:
        hist[t] = hist.get(t, 0) + 1
    return hist


# --- greedy ---------------------------------------------------------------------------------------------


def test_greedy_fast_path_is_argmax_without_logprobs():
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [make_seq(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 0.0]])
    out = Sampler()(logits, [make_seq(temperature=0.0), make_seq(temperature=0.0, logprobs=1)])
    assert out.token_ids == [1, 0]


@pytest.mark.parametrize("vocab", [50, 1000, 1024, 5000, 49152])
def test_greedy_argmax_matches_torch_argmax_with_ties(vocab):
    g = torch.Generator().manual_seed(vocab)
    ties = torch.randint(-3, 4, (32, vocab), generator=g).float()  # the max value recurs in every row
    assert torch.equal(greedy_argmax(ties), ties.argmax(dim=-1))
    logits = torch.randn(4, vocab, generator=g)
    logits[0, -1] = 50.0  # best token in the (possibly short) last block
    logits[1, -1] = logits[1, 3] = 50.0  # tie across blocks: the lower id wins
    logits[2, vocab // 2] = 50.0
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    assert greedy_argmax(logits)[1] == 3


def test_tiny_temperature_equals_argmax():
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, [make_seq(temperature=1e-4) for _ in range(64)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_argmax_when_batched_with_sampled_rows():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    seqs = [make_seq(temperature=0.0 if i % 2 == 0 else 1.5) for i in range(6)]
    out = Sampler()(logits, seqs)
    for i in (0, 2, 4):
        assert out.token_ids[i] == int(logits[i].argmax())


# --- top-k / top-p / min-p ------------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    best5 = set(logits[0].topk(5).indices.tolist())
    hist = sample_support(logits, temperature=3.0, top_k=5)  # hot: all five get sampled
    assert set(hist) == best5


def test_top_k_disabled_values_keep_everything():
    logits = torch.zeros(1, 6)
    for k in (0, -1, 6, 100):
        assert set(sample_support(logits, num_samples=600, top_k=k)) == set(range(6))


@pytest.mark.parametrize(
    ("top_p", "support"),
    [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.5, {0}), (0.1, {0}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, support):
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(sample_support(logits, top_p=top_p)) == support


def test_top_p_applies_to_probs_renormalised_after_top_k():
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    # Alone, top_p 0.5 needs tokens 0 and 1 (0.4 < 0.5); after top_k=2 token 0 has 4/7 >= 0.5 on its own.
    assert set(sample_support(logits, top_p=0.5)) == {0, 1}
    assert set(sample_support(logits, top_p=0.5, top_k=2)) == {0}


def test_top_k_top_p_mask_directly():
    logits = logits_from_probs([0.05, 0.5, 0.15, 0.3]).repeat(3, 1)  # [3, 4], unsorted vocab order
    masked = apply_top_k_top_p(logits, torch.tensor([4, 3, 1]), torch.tensor([0.8, 1.0, 1.0]))
    kept = torch.isfinite(masked)
    assert kept[0].tolist() == [False, True, False, True]
    assert kept[1].tolist() == [False, True, True, True]
    assert kept[2].tolist() == [False, True, False, False]
    assert torch.equal(masked[kept], logits[kept])  # survivors are untouched


def reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Survivors by the textbook recipe: sort, cut to k, renormalise, smallest prefix reaching p."""
    probs, ids = row.softmax(dim=-1).double().sort(descending=True)
    probs, ids = probs[:k], ids[:k]
    if p >= 1.0:
        return set(ids.tolist())
    probs = probs / probs.sum()
    keep, mass = [], 0.0
    for prob, token in zip(probs.tolist(), ids.tolist(), strict=True):
        keep.append(token)
        mass += prob
        if mass >= p - 1e-6:
            break
    return set(keep)


@pytest.mark.parametrize("scale", [4.0, 0.05])  # peaked (candidate path) and flat (falls back to a sort)
def test_top_k_top_p_matches_reference_on_a_large_vocab(scale):
    vocab = 6000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(8)) * scale
    top_k = [vocab, 40, 3000, vocab, 1, vocab]
    top_p = [0.9, 1.0, 0.7, 0.3, 0.5, 1.0]
    masked = apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    for row in range(6):
        kept = set(torch.isfinite(masked[row]).nonzero().squeeze(1).tolist())
        assert kept == reference_keep(logits[row], top_k[row], top_p[row]), row
    assert torch.isfinite(masked[5]).all()  # a row with nothing to filter keeps the whole vocabulary


@pytest.mark.parametrize(
    ("min_p", "support"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0}), (0.0, {0, 1, 2, 3})]
)
def test_min_p_drops_tokens_below_fraction_of_best(min_p, support):
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(sample_support(logits, min_p=min_p)) == support


def test_min_p_directly():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.25, 0.05]])
    out = apply_min_p(probs, torch.tensor([0.2, 0.5]))
    assert torch.equal(out, torch.tensor([[0.5, 0.3, 0.15, 0.0], [0.0, 0.6, 0.0, 0.0]]))


# --- distributions ------------------------------------------------------------------------------------


def chi_square(hist: dict[int, int], expected_probs: list[float], n: int) -> float:
    return sum((hist.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(expected_probs))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sampled_frequencies_match_the_tempered_distribution(temperature):
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 20_000
    hist = sample_support(logits_from_probs(probs), num_samples=n, temperature=temperature)
    tempered = [p ** (1 / temperature) for p in probs]
    expected = [p / sum(tempered) for p in tempered]
    # df = 3: P(chi2 > 16.27) = 0.001.
    assert chi_square(hist, expected, n) < 16.27


@pytest.mark.parametrize(
    "params",
    [
        dict(top_p=0.7),
        dict(top_p=0.9, min_p=0.6),
        dict(top_k=3),
        dict(top_k=4, top_p=0.7),
        dict(top_k=4, min_p=0.6),
    ],
)
def test_filtered_draws_follow_the_filtered_distribution(params):
    # Without top-k a quarter of first draws land outside {0, 1, 2} and draw again; with it the draw is among
    # the ranked best alone. Either way the proportions are the filtered distribution's.
    probs = [0.3, 0.25, 0.2, 0.15, 0.1]
    n = 20_000
    hist = sample_support(logits_from_probs(probs), num_samples=n, **params)
    assert set(hist) == {0, 1, 2}
    assert chi_square(hist, [0.3 / 0.75, 0.25 / 0.75, 0.2 / 0.75], n) < 13.82  # df = 2, P = 0.001


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    seqs = [make_seq(temperature=2.0, top_p=1e-300) for _ in range(4)]  # 0.0 as a float32
    out = Sampler()(logits, seqs)
    assert not out.errors and out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_rows_mixed_with_greedy_nucleus_and_broken_rows():
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(4))
    logits[2, 5] = float("nan")
    logits[4, 7] = float("nan")
    seqs = [make_seq(temperature=0.0), make_seq(top_k=1), make_seq(top_k=5), make_seq(top_k=2, temperature=3.0),
            make_seq(top_p=0.5), make_seq(top_p=1e-9)]  # fmt: skip
    out = Sampler()(logits, seqs)
    best = logits.argmax(dim=-1).tolist()
    assert out.token_ids[:2] == best[:2] and out.token_ids[5] == best[5] and sorted(out.errors) == [2, 4]
    assert out.token_ids[3] in logits[3].topk(2).indices.tolist()


def test_sampled_frequencies_match_across_vocab_blocks():
    # Mass spread over block edges and the short last block of a 1000-token vocabulary.
    ids = [0, 255, 256, 300, 511, 767, 768, 990, 999]
    weights = [0.05, 0.2, 0.1, 0.15, 0.05, 0.1, 0.2, 0.1, 0.05]
    probs = torch.zeros(1000)
    probs[ids] = torch.tensor(weights)
    n = 20_000
    hist = sample_support(probs.log().unsqueeze(0), num_samples=n)
    assert set(hist) <= set(ids)
    counts = {rank: hist.get(token, 0) for rank, token in enumerate(ids)}
    assert chi_square(counts, weights, n) < 26.12  # df = 8, P = 0.001


def test_seeded_row_sampling_matches_the_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    seq = make_seq(seed=11)
    sampler = Sampler()
    hist: dict[int, int] = {}
    n = 4000
    for _ in range(n):
        t = sampler(logits_from_probs(probs), [seq]).token_ids[0]
        hist[t] = hist.get(t, 0) + 1
    assert chi_square(hist, probs, n) < 16.27


# --- seeds --------------------------------------------------------------------------------------------


def run_seeded(batch_size: int, position: int, steps: int = 8) -> list[int]:
    """Tokens a seed-42 row samples over ``steps`` steps, placed at ``position`` among unseeded rows."""
    vocab_logits = torch.randn(steps, 200, generator=torch.Generator().manual_seed(9))
    seeded = make_seq(seed=42, temperature=0.9, top_p=0.95)
    others = [make_seq(temperature=1.3) for _ in range(batch_size - 1)]
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        seqs = others[:position] + [seeded] + others[position:]
        logits = torch.randn(batch_size, 200)  # other rows change freely
        logits[position] = vocab_logits[step]
        token = sampler(logits, seqs).token_ids[position]
        seeded.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_row_reproduces_regardless_of_batch():
    torch.manual_seed(0)
    alone = run_seeded(1, 0)
    torch.manual_seed(1)
    assert run_seeded(5, 3) == alone
    torch.manual_seed(2)
    assert run_seeded(17, 0) == alone


def test_seeded_row_ignores_whether_the_batch_forces_a_full_sort():
    vocab = 5000
    steps = torch.randn(10, vocab, generator=torch.Generator().manual_seed(10)) * 3  # nucleus in the top 1024

    def run(with_flat_row: bool) -> list[int]:
        seeded = make_seq(seed=3, top_p=0.9)
        sampler = Sampler()
        tokens = []
        for logits in steps:
            batch, seqs = logits.unsqueeze(0), [seeded]
            if with_flat_row:  # its nucleus spans thousands of tokens: the whole batch gets sorted
                batch = torch.cat([batch, torch.zeros(1, vocab)])
                seqs = [seeded, make_seq(top_p=0.9)]
            tokens.append(sampler(batch, seqs).token_ids[0])
        return tokens

    assert run(False) == run(True)


def test_different_seeds_and_seq_indices_draw_differently():
    logits = torch.zeros(1, 1000)
    streams = []
    for seed, index in ((1, 0), (2, 0), (1, 1)):
        seq = make_seq(seed=seed, seq_index=index)
        sampler = Sampler()
        streams.append([sampler(logits, [seq]).token_ids[0] for _ in range(10)])
    assert streams[0] != streams[1]
    assert streams[0] != streams[2]


# --- penalties and min_tokens -------------------------------------------------------------------------


def _penalise(logits, prompts, outputs, repetition, presence, frequency):
    """``apply_penalties`` over token lists, as a sequence's device rows hold them (ids outside the vocab
    skipped)."""
    n, vocab = logits.shape
    in_prompt = torch.zeros(n, vocab, dtype=torch.bool)
    counts = torch.zeros(n, vocab, dtype=torch.int32)
    rows, ids = token_rows(prompts, vocab)
    in_prompt[rows, ids] = True
    rows, ids = token_rows(outputs, vocab)
    counts.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)),
                      torch.ones(len(rows), dtype=torch.int32), accumulate=True)  # fmt: skip
    return apply_penalties(
        logits, in_prompt, counts, torch.tensor(repetition), torch.tensor(presence), torch.tensor(frequency)
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0, 1.0], [2.0, -2.0, 3.0, -1.0, 4.0, 1.0]])
    out = _penalise(logits, [[0, 1, 1], [5]], [[2, 3, 3], []], [2.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    # row 0: 0 and 1 seen in the prompt, 2 and 3 in the output, 4 and 5 never; row 1 has no penalty.
    assert out.tolist() == [[1.0, -4.0, 1.5, -2.0, 4.0, 1.0], [2.0, -2.0, 3.0, -1.0, 4.0, 1.0]]
    assert out is logits  # in place


def test_presence_and_frequency_penalties_use_output_tokens_only():
    logits = torch.zeros(2, 5)
    out = _penalise(
        logits,
        [[0, 1], [0]],
        [[1, 2, 2, 2], [4]],
        [1.0, 1.0],
        [0.5, -1.0],
        [0.25, 0.0],
    )
    # row 0: token 1 once -> 0.5 + 0.25, token 2 three times -> 0.5 + 0.75; prompt-only token 0 untouched.
    assert out[0].tolist() == pytest.approx([0.0, -0.75, -1.25, 0.0, 0.0])
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])


def test_penalties_ignore_ids_outside_the_vocab():
    out = _penalise(torch.zeros(2, 3), [[7], []], [[3, -1], [0]], [2.0, 2.0], [1.0, 1.0], [0.0, 0.0])
    assert out.tolist() == [[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]  # id 3 of row 0 must not hit row 1


def test_all_penalties_compose_repetition_first():
    logits = torch.tensor([[3.0, -1.0, 0.5]])
    out = _penalise(logits, [[]], [[0, 0, 1]], [1.5], [0.1], [0.2])
    assert out[0].tolist() == pytest.approx([3.0 / 1.5 - 0.1 - 0.4, -1.5 - 0.1 - 0.2, 0.5])


def test_penalty_counts_follow_the_tokens_each_step_samples():
    # Counted on the device as they are sampled: the host's output list is not read again.
    sampler = Sampler()
    seq = make_seq(prompt=[3], temperature=0.0, frequency_penalty=1.5)
    logits = torch.tensor([[5.0, 4.0, 2.5, 1.0]])
    picks = []
    for _ in range(4):
        picks.append(sampler(logits, [seq]).token_ids[0])
        seq.output_token_ids.append(picks[-1])
    # 5 > 4; then 5 - 1.5 < 4; then 3.5 > 4 - 1.5; then 5 - 3 < 2.5, a tie of ids 1 and 2 (the lower wins)
    assert picks == [0, 1, 0, 1]
    sampler.release(seq)
    assert len(sampler._penalties) == 0


def test_sampler_applies_penalties_before_choosing():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    sampler = Sampler()
    assert sampler(logits, [make_seq(prompt=[0], temperature=0.0)]).token_ids == [0]
    assert sampler(logits, [make_seq(prompt=[0], temperature=0.0, repetition_penalty=2.0)]).token_ids == [1]
    assert sampler(logits, [make_seq(output=[0], temperature=0.0, presence_penalty=1.5)]).token_ids == [1]
    freq = make_seq(output=[0, 0, 0], temperature=0.0, frequency_penalty=0.5)
    assert sampler(logits, [freq]).token_ids == [1]
    # presence/frequency ignore the prompt
    assert sampler(logits, [make_seq(prompt=[0], temperature=0.0, presence_penalty=2.0)]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[9.0, 1.0, 8.0, 7.0]])  # EOS (0) best, stop token 2 next
    sampler = Sampler()
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert sampler(logits, [make_seq(output=[1, 1], **params)]).token_ids == [3]
    assert sampler(logits, [make_seq(output=[1, 1, 1], **params)]).token_ids == [0]
    assert sampler(logits, [make_seq(output=[1], ignore_eos=True, **params)]).token_ids == [3]
    hot = sample_support(logits, num_samples=2000, temperature=5.0, min_tokens=1, stop_token_ids=[2])
    assert set(hot) == {1, 3}


# --- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_rank_and_top():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    seqs = [
        make_seq(output=[7, 7], temperature=0.7, logprobs=4, repetition_penalty=1.8, presence_penalty=1.0),
        make_seq(temperature=0.0),
        make_seq(temperature=0.0, logprobs=0),
    ]
    out = Sampler()(logits, seqs)
    assert out.logprobs[1] is None
    expected = torch.log_softmax(logits, dim=-1)
    for row in (0, 2):
        lp = out.logprobs[row]
        token = out.token_ids[row]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(expected[row, token]), abs=1e-6)
        assert lp.rank == int((expected[row] > expected[row, token]).sum()) + 1
    assert out.logprobs[2].rank == 1 and out.logprobs[2].top == []
    top = out.logprobs[0].top
    values, ids = expected[0].topk(4)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))


def test_logprob_rank_of_a_sampled_unlikely_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, -20.0]])
    out = Sampler()(logits, [make_seq(temperature=1.0, top_k=1, logprobs=2)])
    assert out.token_ids == [0] and out.logprobs[0].rank == 1
    out = Sampler()(logits, [make_seq(output=[0, 1], temperature=0.0, repetition_penalty=100.0, logprobs=1)])
    assert out.token_ids == [2]
    assert out.logprobs[0].rank == 3  # rank is under the raw logits, not the penalised ones
    assert out.logprobs[0].logprob == pytest.approx(3.0 - math.log(math.exp(5) + math.exp(4) + math.exp(3)))


def test_prompt_logprobs():
    logits = torch.randn(300, 20, generator=torch.Generator().manual_seed(6))  # > one internal chunk
    targets = torch.randint(0, 20, (300,), generator=torch.Generator().manual_seed(7)).tolist()
    out = Sampler().prompt_logprobs(logits, targets, num_top=3)
    expected = torch.log_softmax(logits, dim=-1)
    assert len(out) == 300
    for i in (0, 150, 299):
        assert out[i].token_id == targets[i]
        assert out[i].logprob == pytest.approx(float(expected[i, targets[i]]), abs=1e-6)
        assert out[i].rank == int((expected[i] > expected[i, targets[i]]).sum()) + 1
        assert [t for t, _ in out[i].top] == expected[i].topk(3).indices.tolist()


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [make_seq()])
