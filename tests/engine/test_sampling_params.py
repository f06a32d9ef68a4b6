"""SamplingParams: valid settings construct; every invalid field raises ValueError naming that field."""

from __future__ import annotations

import pytest

from longserve.engine.sampling_params import GREEDY_TEMPERATURE, SamplingParams

INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("temperature", float("nan")),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", None),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", True),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", float("nan")),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", True),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("min_tokens", -1),
    ("min_tokens", 1.0),
    ("logprobs", -1),
    ("logprobs", 2.0),
    ("logprobs", True),
    ("prompt_logprobs", -3),
    ("prompt_logprobs", "5"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field)


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens .*max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_defaults_construct():
    params = SamplingParams()
    assert params.n == 1 and params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.max_tokens == 16 and params.stop == [] and params.stop_token_ids == []
    assert not params.greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(top_k=-1),
        dict(top_k=50, top_p=0.9, min_p=0.05),
        dict(top_p=1.0, min_p=1.0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.3),
        dict(seed=0, n=4),
        dict(max_tokens=None, min_tokens=1000),
        dict(max_tokens=8, min_tokens=8),
        dict(logprobs=0, prompt_logprobs=20),
        dict(stop_token_ids=[0, 2]),
    ],
)
def test_valid_edge_values_construct(kwargs):
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(params, key) == value


def test_greedy_means_a_temperature_below_the_float32_safe_bound():
    # Below GREEDY_TEMPERATURE logits / temperature overflows float32 and the softmax is NaN (as vLLM, greedy).
    for t in (0, 1e-40, 5e-324, GREEDY_TEMPERATURE / 2):
        assert SamplingParams(temperature=t).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


@pytest.mark.parametrize("value", [1e-300, 5e-324, 0.0099, 100.5, 1e300])
def test_repetition_penalties_that_overflow_float32_are_rejected(value):
    with pytest.raises(ValueError, match=r"^repetition_penalty must be in \[0.01, 100\]"):
        SamplingParams(repetition_penalty=value)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_seeds_outside_int64_are_rejected(seed):
    with pytest.raises(ValueError, match="^seed must be a 64-bit signed integer"):
        SamplingParams(seed=seed)


def test_extreme_int64_seeds_work_for_every_completion():
    from longserve.engine.sequence import Sequence

    for seed in (2**63 - 1, -(2**63)):
        params = SamplingParams(seed=seed, n=4)
        seqs = [Sequence("r", i, [1], params, frozenset(), 8) for i in range(4)]
        assert len({seq.generator.initial_seed() for seq in seqs}) == 4


def test_stop_accepts_a_single_string_and_copies_lists():
    assert SamplingParams(stop="###").stop == ["###"]
    stops = ["a", "b"]
    params = SamplingParams(stop=stops, stop_token_ids=(5, 6))
    stops.append("c")
    assert params.stop == ["a", "b"] and params.stop_token_ids == [5, 6]
    assert SamplingParams(stop=None).stop == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", True),
        ("max_tokens", True),
        ("min_tokens", True),
        ("stop_token_ids", [True]),
        ("temperature", float("inf")),
    ],
)
def test_booleans_and_infinities_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})
