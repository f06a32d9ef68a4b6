"""The sampling parameter table: one row per sequence, written once, reused after release, grown on demand."""

import numpy as np
import torch

from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sampling_table import GREEDY, MIN_P, SEEDED, TEMPERATURE, TOP_K, TOP_P, SamplingTable
from longserve.engine.sequence import Sequence


def _seq(name: str, **params) -> Sequence:
    return Sequence(name, 0, [1, 2], SamplingParams(**params), frozenset(), 64)


def test_rows_hold_each_sequences_parameters_and_greedy_rows_are_neutral():
    table = SamplingTable(vocab=100, capacity=2)
    sampled = _seq("a", temperature=0.5, top_k=7, top_p=0.9, min_p=0.1)
    seeded = _seq("b", temperature=1.0, top_k=500)  # a top-k beyond the vocabulary is off
    seeded.generator = torch.Generator().manual_seed(1)
    greedy = _seq("c", temperature=0, top_k=3)
    rows = table.rows([sampled, seeded, greedy, sampled])  # grows past its capacity; a repeat shares its row
    assert rows[0] == rows[3] and len(set(rows.tolist())) == 3 and len(table) == 3
    values = table.values[rows]
    columns = [TEMPERATURE, TOP_K, TOP_P, MIN_P, GREEDY, SEEDED]
    assert values[0, columns].tolist() == [0.5, 7, 0.9, 0.1, 0, 0]
    assert values[1, columns].tolist() == [1.0, 100, 1.0, 0.0, 0, 1]
    assert values[2, columns].tolist() == [1.0, 100, 1.0, 0.0, 1, 0]


def test_a_released_row_is_reused_and_rewritten():
    table = SamplingTable(vocab=100, capacity=4)
    first = _seq("a", temperature=0.5)
    (row,) = table.rows([first])
    table.release(first)
    table.release(first)  # a second release is a no-op
    second = _seq("b", temperature=0.25)
    assert table.rows([second]).tolist() == [row] and len(table) == 1
    assert table.values[row, TEMPERATURE] == 0.25
    assert np.array_equal(table.rows([second]), [row])


def test_the_sampler_samples_more_rows_than_the_table_first_holds_in_one_batch(caplog):
    from longserve.engine.sampler import Sampler

    seqs = [_seq(f"s{i}", temperature=0.7, top_p=0.9) for i in range(600)]
    out = Sampler()(torch.zeros(600, 50), seqs)
    assert not out.errors and "failed" not in caplog.text  # no row-by-row fallback
