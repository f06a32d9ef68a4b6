"""Rejection sampling keeps the target distribution exactly: on crafted target distributions and drafts, the
tokens it emits are distributed as the target's (a chi-square test with a fixed seed, strong enough that a
wrong acceptance rule fails it), through ``verify_rows`` and through the sampler with its filters."""

import pytest
import torch
from chi_square import p_value

from longserve.engine.sampler import Sampler
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence
from longserve.engine.spec_decode.rejection import accepted_runs, verify_rows

SAMPLES = 40_000


def _emitted_first(probs: torch.Tensor, draft: int, rule: str = "exact") -> torch.Tensor:
    """The first token a verification emits for SAMPLES copies of one row with one draft."""
    m = SAMPLES
    rows = probs.expand(m, -1).contiguous()
    drafts = torch.full((m,), draft)
    nan = torch.full((m,), float("nan"), dtype=torch.float64)
    accepted, tokens = verify_rows(rows, drafts, nan, nan, any_seeded=False)
    if rule == "accept_always":
        accepted = torch.ones_like(accepted)
    elif rule == "no_residual":  # a rejection redraws from p itself, which double counts the draft
        tokens = torch.multinomial(rows, 1).squeeze(1)
    return torch.where(accepted, drafts, tokens)


@pytest.mark.parametrize("draft", [2, 0, 5], ids=["likely", "most-likely", "impossible"])
def test_point_mass_drafts_keep_the_target_distribution(draft):
    torch.manual_seed(0)
    probs = torch.tensor([0.35, 0.05, 0.25, 0.1, 0.15, 0.0, 0.07, 0.03])
    counts = torch.bincount(_emitted_first(probs, draft), minlength=8)
    assert p_value(counts, probs) > 1e-3
    if draft != 5:  # the check is strong enough to catch a wrong rule
        for rule in ("accept_always", "no_residual"):
            wrong = torch.bincount(_emitted_first(probs, draft, rule), minlength=8)
            assert wrong[5] == 0 and p_value(wrong, probs) < 1e-6, rule


def test_a_draft_with_all_the_mass_is_always_accepted():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    nan = torch.full((2,), float("nan"), dtype=torch.float64)
    accepted, tokens = verify_rows(probs, torch.tensor([1, -1]), nan, nan, any_seeded=False)
    assert accepted.tolist() == [True, False] and tokens.tolist()[1] == 1


def test_accepted_runs_stop_at_the_first_rejection():
    runs = accepted_runs([[5, 6, 7], [], [9]], [True, False, True, False, False, True, True])
    assert [(r.accepted, r.token_row) for r in runs] == [([5], 1), ([], 4), ([9], 6)]


def _seqs(params: SamplingParams, count: int) -> list[Sequence]:
    return [Sequence(f"s{i}", 0, [1, 2, 3], params, frozenset(), 100) for i in range(count)]


def test_the_sampler_keeps_filtered_distributions_over_a_run_of_drafts():
    """Two drafts per sequence with temperature, top-k and top-p: the first emitted token follows row 0's
    filtered distribution, and the second, given the first draft held, row 1's."""
    torch.manual_seed(1)
    vocab, m = 12, 12_000
    base = torch.randn(3, vocab) * 1.5  # rows: after the last token, after draft 1, after draft 2
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    d1, d2 = base[0].argsort(descending=True)[1].item(), base[1].argsort(descending=True)[0].item()
    seqs = _seqs(params, m)
    out = Sampler().verify(base.repeat(m, 1), seqs, [[d1, d2]] * m).to_host()
    assert not out.errors
    first = torch.tensor([out.accepted[i][0][0] if i in out.accepted else out.token_ids[i] for i in range(m)])
    second = torch.tensor(
        [
            (out.accepted[i][1][0] if len(out.accepted[i]) > 1 else out.token_ids[i])
            for i in range(m)
            if i in out.accepted
        ]
    )
    for row, emitted in ((0, first), (1, second)):
        logits = base[row] / params.temperature
        order = logits.argsort(descending=True)
        kept = torch.zeros(vocab, dtype=torch.bool)
        kept[order[:6]] = True
        within = (logits.masked_fill(~kept, float("-inf"))).softmax(-1)
        cum = within[order].cumsum(0)
        nucleus = torch.zeros(vocab, dtype=torch.bool)
        nucleus[order[: int((cum - within[order] < 0.9 - 1e-6).sum())]] = True
        target = logits.masked_fill(~(kept & nucleus), float("-inf")).softmax(-1)
        assert p_value(torch.bincount(emitted, minlength=vocab), target) > 1e-3, row


def test_greedy_rows_accept_only_the_argmax_and_seeds_reproduce():
    vocab = 10
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(2))  # 3 greedy rows, 2 seeded
    best = logits.argmax(-1).tolist()
    greedy = _seqs(SamplingParams(temperature=0), 1)[0]
    drafts = [[best[0], (best[1] + 1) % vocab], [best[3]]]
    outs = []
    for _ in range(2):
        seeded = Sequence("s", 0, [1], SamplingParams(temperature=1.0, seed=4), frozenset(), 100)
        outs.append(Sampler().verify(logits, [greedy, seeded], drafts).to_host())
    assert outs[0].accepted[0] == [(best[0], None)] and outs[0].token_ids[0] == best[1]
    assert outs[0].token_ids[1] == outs[1].token_ids[1] and outs[0].accepted == outs[1].accepted


def test_penalties_count_the_drafts_before_each_row():
    """Row 1 comes after draft 1: a frequency penalty on it there turns the argmax away from repeating it."""
    vocab = 8
    logits = torch.zeros(3, vocab)
    logits[0, 5] = 3.0  # row 0: draft 1 (token 5) is the argmax
    logits[1, 5], logits[1, 6] = 2.0, 1.5  # row 1: 5 again, unless it is penalised for draft 1
    seq = _seqs(SamplingParams(temperature=0, frequency_penalty=1.0), 1)[0]
    sampler = Sampler()
    out = sampler.verify(logits, [seq], [[5, 5]]).to_host()
    assert out.accepted[0] == [(5, None)] and out.token_ids[0] == 6
    # The next step counts what the run emitted (5, then 6): both penalised once.
    seq.output_token_ids += [5, 6]
    row = torch.zeros(1, vocab)
    row[0, 5], row[0, 6], row[0, 2] = 1.9, 1.9, 1.0
    assert sampler.verify(row, [seq], [[]]).to_host().token_ids[0] == 2
