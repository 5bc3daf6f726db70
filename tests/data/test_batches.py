import pytest
import torch

from lopt_dist.data import IGNORE_INDEX, MicroBatches

PAD = 0


def _examples(n):
    """Example i has i + 2 tokens, all equal to i + 1 (never PAD), and masks its first token."""
    return [{"input_ids": [i + 1] * (i + 2), "labels": [IGNORE_INDEX] + [i + 1] * (i + 1)} for i in range(n)]


def _batches(n=10, size=4, shuffle=True, seed=0):
    return MicroBatches(_examples(n), micro_batch_size=size, shuffle=shuffle, seed=seed, pad_token_id=PAD)


def test_without_shuffle_the_stream_is_the_examples_in_order_epoch_after_epoch():
    batches = _batches(n=10, size=4, shuffle=False)
    assert batches.example_indices(0) == [0, 1, 2, 3]
    assert batches.example_indices(2) == [8, 9, 0, 1]  # straddles epochs 0 and 1
    assert batches.example_indices(5) == [0, 1, 2, 3]  # stream position 20 = epoch 2, offset 0


def test_each_epoch_is_a_permutation_and_epochs_differ():
    batches = _batches(n=12, size=4, shuffle=True)
    epoch0 = sum((batches.example_indices(i) for i in range(3)), [])
    epoch1 = sum((batches.example_indices(i) for i in range(3, 6)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))


def test_straddling_micro_batch_covers_the_end_and_the_start_of_two_epochs():
    batches = _batches(n=10, size=4, shuffle=True)
    stream = sum((batches.example_indices(i) for i in range(5)), [])  # 20 positions = 2 whole epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert batches.example_indices(2) == stream[8:12]


def test_random_access_is_a_pure_function_of_seed_and_index():
    first, second = _batches(seed=3), _batches(seed=3)
    for index in [7, 0, 123, 3, 7]:  # any order, any instance: a resumed or sharded reader agrees
        assert first.example_indices(index) == second.example_indices(index)
        assert all(torch.equal(a, b) for a, b in zip(first.get(index).values(), second.get(index).values()))
    other = _batches(seed=4)
    assert [first.example_indices(i) for i in range(5)] != [other.example_indices(i) for i in range(5)]


def test_micro_batch_larger_than_the_dataset_spans_several_epochs():
    batches = _batches(n=3, size=7, shuffle=True)
    indices = batches.example_indices(0)
    assert len(indices) == 7
    assert sorted(indices[:3]) == sorted(indices[3:6]) == [0, 1, 2]


def test_padding_mask_and_labels():
    batches = _batches(n=10, size=3, shuffle=False)
    batch = batches.get(1)  # examples 3, 4, 5 with 5, 6, 7 tokens
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 7) for t in batch.values())
    for row, example in enumerate([3, 4, 5]):
        n = example + 2
        assert batch["input_ids"][row, :n].tolist() == [example + 1] * n
        assert batch["input_ids"][row, n:].tolist() == [PAD] * (7 - n)  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (7 - n)
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] + [example + 1] * (n - 1) + [IGNORE_INDEX] * (7 - n)
    assert batches.tokens(1) == 5 + 6 + 7 == int(batch["attention_mask"].sum())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="at least one example"):
        MicroBatches([], micro_batch_size=2, shuffle=True, seed=0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="micro_batch_size"):
        MicroBatches(_examples(2), micro_batch_size=0, shuffle=True, seed=0, pad_token_id=PAD)
    with pytest.raises(IndexError):
        _batches().get(-1)
