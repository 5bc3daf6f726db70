"""Random access to the micro-batches of an endless, epoch-by-epoch shuffled stream of examples.

The stream is epoch 0, epoch 1, ... laid end to end, epoch e being a permutation of all examples seeded by
(seed, e); micro-batch i holds stream positions [i * size, (i + 1) * size) and may straddle two epochs.
Everything is a pure function of (examples, seed, index): a data-parallel worker computes only the
micro-batch indices it owns, and a resumed run restarts at a micro-batch index, without replaying anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lopt_dist.data.tokenize import IGNORE_INDEX


class MicroBatches:
    def __init__(
        self,
        examples: Sequence[dict[str, list[int]]],
        micro_batch_size: int,
        shuffle: bool,
        seed: int,
        pad_token_id: int,
    ) -> None:
        if len(examples) == 0:
            raise ValueError("MicroBatches needs at least one example")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._orders: dict[int, np.ndarray] = {}  # epoch -> permutation, a small cache

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def example_indices(self, index: int) -> list[int]:
        """Which examples micro-batch `index` holds, in order."""
        if index < 0:
            raise IndexError(f"micro-batch index must be >= 0, got {index}")
        start = index * self.micro_batch_size
        positions = (divmod(p, self.num_examples) for p in range(start, start + self.micro_batch_size))
        return [int(self._epoch_order(epoch)[offset]) for epoch, offset in positions]

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels: [micro_batch_size, T] LongTensors, T the longest example,
        right-padded (labels IGNORE_INDEX on the padding)."""
        rows = [self.examples[i] for i in self.example_indices(index)]
        length = max(len(r["input_ids"]) for r in rows)
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(rows):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def tokens(self, index: int) -> int:
        """Non-padding tokens in micro-batch `index`, for throughput figures."""
        return sum(len(self.examples[i]["input_ids"]) for i in self.example_indices(index))

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(self.num_examples, self.shuffle, self.seed, epoch)
            # A worker reads micro-batches in increasing order, touching one or two epochs at a time.
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = order
        return order


def epoch_order(num_examples: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The examples of epoch `epoch` in training order: a permutation seeded by (seed, epoch), or in file order."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_examples)
    return np.arange(num_examples)


def micro_batches(examples: Sequence[dict[str, list[int]]], cfg, pad_token_id: int, shuffle: bool | None = None):
    """The run's micro-batches (`cfg`: the ExperimentConfig): packed rows with data.packing, else padded examples.
    Both are pure functions of (examples, seed, index) with the same `get` / `tokens` / `example_indices`.
    `shuffle`: overrides data.shuffle (evaluation sets are read in file order)."""
    shuffle = cfg.data.shuffle if shuffle is None else shuffle
    if cfg.data.packing:
        from lopt_dist.data.packing import PackedMicroBatches

        return PackedMicroBatches(examples, cfg.train.micro_batch_size, shuffle, cfg.data.seed,
                                  pad_token_id, cfg.data.max_seq_length)
    return MicroBatches(examples, cfg.train.micro_batch_size, shuffle, cfg.data.seed, pad_token_id)
