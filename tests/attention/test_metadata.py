"""Step metadata: decodes as int32 block tables and lengths (what paged kernels read), the per-position slot
table derived from them once per step, prefill spans with their context slots."""

import torch

from longserve.attention.metadata import build_attention_metadata, context_slots

BLOCK = 4


def test_decodes_carry_int32_block_tables_and_lengths_and_derive_slots_once():
    tables = [[7, 3, 9], [5], [2, 8, 6, 1]]
    computed = [9, 2, 12]  # each decodes one token: contexts 10, 3, 13
    meta = build_attention_metadata(tables, computed, [1, 1, 1], BLOCK)
    assert meta.num_decodes == 3 and meta.decode_context_lens == [10, 3, 13]
    assert meta.decode_block_tables.dtype == torch.int32 and meta.decode_seq_lens.dtype == torch.int32
    assert meta.decode_block_tables.tolist() == [[7, 3, 9, 0], [5, 0, 0, 0], [2, 8, 6, 1]]
    assert meta.decode_seq_lens.tolist() == [10, 3, 13] and meta.max_decode_len == 13
    for row, (table, length) in enumerate(zip(tables, [10, 3, 13], strict=True)):
        assert meta.decode_slots[row, :length].tolist() == context_slots(table, length, BLOCK).tolist()
        assert not meta.decode_slots[row, length:].any()  # padding reads slot 0
        assert meta.decode_mask[row, 0, 0].tolist() == [i < length for i in range(13)]
    assert meta.decode_slots is meta.decode_slots  # built once, shared by every layer
    assert meta.slot_mapping.tolist() == [9 * BLOCK + 1, 5 * BLOCK + 2, 1 * BLOCK + 0]


def test_equal_lengths_need_no_mask_and_prefills_follow_decodes():
    table = list(range(1, 8))
    meta = build_attention_metadata([[1, 2], [3, 4], table], [5, 5, 2], [1, 1, 20], BLOCK)
    assert meta.num_decodes == 2 and meta.decode_mask is None
    (span,) = meta.prefills
    assert (span.query_start, span.query_len, span.context_len) == (2, 20, 22)
    assert span.context_slots.tolist() == context_slots(table, 22, BLOCK).tolist()
    assert meta.slot_mapping.tolist()[2:] == context_slots(table, 22, BLOCK).tolist()[2:]
    only_prefill = build_attention_metadata([[1]], [0], [3], BLOCK)
    assert only_prefill.decode_block_tables is None and only_prefill.decode_slots is None


def test_a_few_tokens_after_a_cached_prefix_run_as_decode_rows():
    # A decode, then 3 tokens to verify after a prefix of 6: a decode row each, attending up to itself.
    meta = build_attention_metadata([[9, 1], [7, 5, 3]], [5, 6], [1, 3], BLOCK)
    assert meta.num_decodes == 4 and not meta.prefills
    assert meta.decode_context_lens == [6, 7, 8, 9]
    assert meta.decode_block_tables.tolist() == [[9, 1, 0], [7, 5, 3], [7, 5, 3], [7, 5, 3]]
    assert meta.slot_mapping.tolist() == [1 * BLOCK + 1, 5 * BLOCK + 2, 5 * BLOCK + 3, 3 * BLOCK + 0]
    # Once a prompt chunk has started the prefills, short spans after it stay prefills.
    later = build_attention_metadata([[4, 2], [7, 5, 3]], [0, 6], [5, 3], BLOCK)
    assert later.num_decodes == 0 and len(later.prefills) == 2


def test_block_table_rows_follow_tables_that_grow_restart_and_leave():
    from longserve.attention.metadata import BlockTableRows

    rows = BlockTableRows()
    a, b = [3, 4], list(range(10, 30))
    assert rows.fill([a, b], 3).tolist() == [[3, 4, 0], [10, 11, 12]]
    a.append(5)  # grown in place: only the new block is copied
    b.extend(range(30, 60))  # past the copy's capacity
    assert rows.fill([a, b], 50).tolist() == [[3, 4, 5] + [0] * 47, list(range(10, 60))]
    a = [7]  # preempted and restarted: a new list with the same length as before or not
    assert rows.fill([b, a], 2).tolist() == [[10, 11], [7, 0]]
    assert rows.fill([], 1).shape == (0, 1) and not rows._rows  # those that stopped decoding are dropped


def test_block_table_rows_equal_fresh_copies_as_sequences_come_grow_and_go():
    import random

    from longserve.attention.metadata import BlockTableRows, padded_tables

    rng, rows, live = random.Random(0), BlockTableRows(), []
    for _ in range(300):
        live = [t for t in live if rng.random() > 0.1]  # some stop decoding (their rows are reused)
        live += [[rng.randrange(1, 99)] for _ in range(rng.randrange(3))]  # some join
        for table in live:
            table.extend(rng.randrange(1, 99) for _ in range(rng.choice([0, 0, 0, 1, 40])))
        rng.shuffle(live)
        width = rng.randrange(1, 60)
        assert rows.fill(live, width).tolist() == padded_tables(live, width).tolist()


def test_prefills_carry_block_tables_row_offsets_and_context_lengths():
    # A decode, then two chunks: a fresh prompt of 5 tokens and 3 tokens after a cached prefix of 6.
    meta = build_attention_metadata([[9, 1], [4, 2], [7, 5, 3]], [5, 0, 6], [1, 5, 3], BLOCK)
    paged = meta.paged_prefills
    assert paged.block_tables.dtype == torch.int32 and paged.block_tables.tolist() == [[4, 2, 0], [7, 5, 3]]
    assert paged.query_starts.tolist() == [0, 5, 8] and paged.context_lens.tolist() == [5, 9]
    assert paged.max_query_len == 5
    assert build_attention_metadata([[9, 1]], [5], [1], BLOCK).paged_prefills is None
