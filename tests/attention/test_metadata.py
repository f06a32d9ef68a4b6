"""Step metadata: decodes as int32 block tables and lengths (what paged kernels read), the per-position slot
table derived from them once per step, prefill spans with their context slots."""

import torch

from longserve.attention.metadata import build_attention_metadata, context_slots, plan_attention

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
    assert meta.context_slots(0).tolist() == context_slots(table, 22, BLOCK).tolist()
    assert meta.context_slots(0) is meta.context_slots(0)  # built once, shared by every layer
    assert meta.prefill_slots(0, 5, 9).tolist() == context_slots(table, 9, BLOCK, start=5).tolist()
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


def test_decode_tables_gathered_from_the_block_managers_rows_equal_the_lists():
    import random

    from longserve.engine.kv_cache import BlockManager
    from longserve.engine.sampling_params import SamplingParams
    from longserve.engine.sequence import Sequence

    rng, manager, live = random.Random(0), BlockManager(3000, BLOCK), []
    for step in range(150):
        for seq in [s for s in live if rng.random() < 0.1]:  # some finish (their rows are reused)
            manager.free(seq)
            live.remove(seq)
        for _ in range(rng.randrange(3)):  # some join, with a cached prefix or none
            seq = Sequence(f"r{step}", 0, [1] * 8, SamplingParams(), frozenset(), 10_000)
            manager.start_from(seq, [])
            manager.grow(seq, rng.randrange(1, 40))
            live.append(seq)
        for seq in live:  # they grow, and some lose blocks again (rejected drafts)
            manager.grow(seq, len(seq.block_table) * BLOCK + rng.choice([0, 0, 1, 60]))
            if rng.random() < 0.1:
                manager.trim(seq, rng.randrange(1, len(seq.block_table) * BLOCK + 1))
        manager.check_invariants(live)  # (each row equals its list, padded with the pad block)
        rng.shuffle(live)
        # Decodes, then 3-token verifications: each writes positions inside the blocks it holds.
        query = [1 if i % 4 else 3 for i in range(len(live))]
        order = sorted(range(len(live)), key=lambda i: query[i])
        seqs = [live[i] for i in order]
        lens = [query[i] for i in order]
        computed = [
            rng.randrange(1, len(s.block_table) * BLOCK - q + 1) for s, q in zip(seqs, lens, strict=True)
        ]
        tables = [s.block_table for s in seqs]
        rows = [s.table_row for s in seqs]
        gathered = plan_attention(tables, computed, lens, BLOCK, manager.tables.array, rows)
        copied = plan_attention(tables, computed, lens, BLOCK)
        assert gathered.decode_tables.tolist() == copied.decode_tables.tolist()
        assert gathered.decode_new_slots.tolist() == copied.decode_new_slots.tolist()
        assert gathered.decode_lens == copied.decode_lens


def test_prefills_carry_block_tables_row_offsets_and_context_lengths():
    # A decode, then two chunks: a fresh prompt of 5 tokens and 3 tokens after a cached prefix of 6.
    meta = build_attention_metadata([[9, 1], [4, 2], [7, 5, 3]], [5, 0, 6], [1, 5, 3], BLOCK)
    paged = meta.paged_prefills
    assert paged.block_tables.dtype == torch.int32 and paged.block_tables.tolist() == [[4, 2, 0], [7, 5, 3]]
    assert paged.query_starts.tolist() == [0, 5, 8] and paged.context_lens.tolist() == [5, 9]
    assert paged.max_query_len == 5
    assert build_attention_metadata([[9, 1]], [5], [1], BLOCK).paged_prefills is None
