"""ForwardBatch.build: the flat rows of one step and their paged-KV addressing."""

from __future__ import annotations

import torch

from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk

BS = 4


def longs(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def test_rows_positions_and_slots_follow_the_block_tables() -> None:
    decode = SequenceChunk([11], start_pos=5, block_table=[7, 3])  # position 5: block 3, offset 1
    prompt = SequenceChunk([1, 2, 3], start_pos=3, block_table=[5, 2])  # positions 3, 4, 5
    batch = ForwardBatch.build([decode, prompt], BS)
    assert batch.input_ids.tolist() == [11, 1, 2, 3]
    assert batch.positions.tolist() == [5, 3, 4, 5]
    assert batch.slot_mapping.tolist() == [3 * BS + 1, 5 * BS + 3, 2 * BS + 0, 2 * BS + 1]
    assert batch.ctx_lens.tolist() == [6, 4, 5, 6]  # each row attends to keys 0..its own position
    assert batch.num_tokens == 4 and batch.block_size == BS


def test_block_tables_are_cut_at_the_last_new_token_and_zero_padded() -> None:
    chunks = [
        SequenceChunk([1], start_pos=2, block_table=[9, 8, 7]),  # needs 1 block of its 3
        SequenceChunk([1, 2, 3, 4, 5], start_pos=0, block_table=[4, 6]),  # needs 2
    ]
    batch = ForwardBatch.build(chunks, BS)
    assert batch.block_tables.tolist() == [[9, 0], [4, 6]]
    assert batch.table_of_row.tolist() == [0, 1, 1, 1, 1, 1]


def test_one_token_chunks_first_are_decode_rows() -> None:
    chunks = [
        SequenceChunk([1], start_pos=9, block_table=[1, 2, 3]),
        SequenceChunk([2], start_pos=3, block_table=[4]),
        SequenceChunk([3, 4], start_pos=0, block_table=[5]),
        SequenceChunk([5], start_pos=0, block_table=[6]),  # one token, but after a prefill chunk
    ]
    batch = ForwardBatch.build(chunks, BS)
    assert batch.num_decode == 2
    assert batch.decode_ctx == 10  # the longest decode context
    assert [(p.start, p.length) for p in batch.prefills] == [(2, 2), (4, 1)]
    # Decode rows of different lengths are padded: the mask hides keys past each row's own.
    assert batch.decode_mask is not None
    assert batch.decode_mask.shape == (2, 1, 1, 10)
    assert batch.decode_mask[1, 0, 0].tolist() == [True] * 4 + [False] * 6


def test_only_decodes_need_no_row_table_and_equal_lengths_no_mask() -> None:
    chunks = [SequenceChunk([1], 3, [1]), SequenceChunk([2], 3, [2])]
    batch = ForwardBatch.build(chunks, BS)
    assert batch.num_decode == 2 and not batch.prefills
    assert batch.table_of_row is None  # row b reads table b
    assert batch.decode_mask is None and batch.decode_sliding_mask is None


def test_prefill_masks_are_causal_and_offset_by_the_cached_context() -> None:
    fresh = SequenceChunk([1, 2, 3], start_pos=0, block_table=[1])
    cached = SequenceChunk([4, 5], start_pos=3, block_table=[2, 3])
    batch = ForwardBatch.build([fresh, cached], BS)
    first, second = batch.prefills
    assert first.mask is None  # plain causal over its own keys
    assert first.context_slots.tolist() == [4, 5, 6]
    assert second.context_slots.tolist() == [8, 9, 10, 11, 12]
    assert second.mask.tolist() == [[True, True, True, True, False], [True] * 5]


def test_sliding_window_masks() -> None:
    window = 3
    decode = SequenceChunk([1], start_pos=5, block_table=[1, 2])  # query at 5 sees 3, 4, 5
    short = SequenceChunk([1], start_pos=1, block_table=[3])  # query at 1 sees 0, 1
    prompt = SequenceChunk([1, 2, 3, 4, 5], start_pos=0, block_table=[4, 5])
    batch = ForwardBatch.build([decode, short, prompt], BS, sliding_window=window)
    sliding = batch.decode_sliding_mask
    assert sliding is not None and sliding.shape == (2, 1, 1, 6)
    assert sliding[0, 0, 0].tolist() == [False, False, False, True, True, True]
    assert sliding[1, 0, 0].tolist() == [True, True, False, False, False, False]
    span = batch.prefills[0]
    expected = [[0 <= q - k < window for k in range(5)] for q in range(5)]
    assert span.sliding_mask.tolist() == expected
    # Within the window nothing is cut: no sliding masks at all.
    small = ForwardBatch.build([SequenceChunk([1, 2], 0, [1])], BS, sliding_window=window)
    assert small.prefills[0].sliding_mask is None


def test_logits_rows_are_the_last_row_of_chunks_that_want_them() -> None:
    chunks = [
        SequenceChunk([1], 4, [1, 2]),
        SequenceChunk([1, 2, 3], 0, [3], want_logits=False),  # a prefill chunk mid-prompt
        SequenceChunk([1, 2], 0, [4]),
    ]
    batch = ForwardBatch.build(chunks, BS)
    assert torch.equal(batch.logits_indices, longs([0, 5]))
    every = ForwardBatch.build(chunks, BS, all_logits=True)
    assert every.logits_indices is None  # prompt logprobs: the head runs on every row


def test_a_verify_chunk_runs_as_decode_rows() -> None:
    """1 + k rows that all want logits become one decode row per position, each with its own context."""
    decode = SequenceChunk([11], start_pos=5, block_table=[7, 3])
    verify = SequenceChunk([1, 2, 3], start_pos=6, block_table=[5, 2, 6], num_logits=3)
    prompt = SequenceChunk([4, 5], start_pos=0, block_table=[8])
    batch = ForwardBatch.build([decode, verify, prompt], BS)
    assert batch.num_decode == 4 and len(batch.prefills) == 1
    assert batch.positions.tolist() == [5, 6, 7, 8, 0, 1]
    assert batch.ctx_lens.tolist() == [6, 7, 8, 9, 1, 2]  # causal within the verify chunk
    assert batch.block_tables.tolist()[1:4] == [[5, 2, 0], [5, 2, 0], [5, 2, 6]]
    assert batch.logits_indices.tolist() == [0, 1, 2, 3, 5]
