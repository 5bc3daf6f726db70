"""Sequence packing (`data.packing`): several whole examples in each row of at most max_seq_length tokens.

Each epoch's examples, in the order `MicroBatches` would train them, are packed into rows first-fit over the
last `OPEN_ROWS` rows still open (an example goes into the first of them it fits in, else opens a new row; the
oldest open row is closed when there are too many). Rows of all epochs are laid end to end and micro-batch i
holds rows [i * size, (i + 1) * size): like `MicroBatches`, a pure function of (examples, seed, index), so data-
parallel workers and resumed runs compute the micro-batches they own without replaying anything.

A packed row keeps its examples apart: `position_ids` restart at 0 at each example (and at the padding after
the last one), which is what the family's own mask helpers read to build per-example causal masks, and what the
rotary embeddings use. Labels of each example's first token are ignored, as they are in an unpacked row (the
first token has nothing before it to be predicted from): the token-weighted mean loss of a packed micro-batch is
therefore exactly that of the same examples unpacked. `attention_mask` marks the real tokens, for the losses.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from lopt_dist.data.batches import epoch_order
from lopt_dist.data.tokenize import IGNORE_INDEX

OPEN_ROWS = 8  # rows an example may still be placed in; more packs tighter but moves examples further apart


def pack_rows(lengths: Sequence[int], capacity: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Positions into `lengths`, grouped into rows of at most `capacity` tokens, first-fit over the open rows."""
    done: list[list[int]] = []
    open_: list[tuple[list[int], list[int]]] = []  # ([tokens used], positions)
    for position, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"an example of {length} tokens does not fit a row of {capacity}")
        for used, members in open_:
            if used[0] + length <= capacity:
                used[0] += length
                members.append(position)
                break
        else:
            open_.append(([length], [position]))
            if len(open_) > open_rows:
                done.append(open_.pop(0)[1])
    return done + [members for _, members in open_]


def collate_packed(rows: list[list[dict[str, list[int]]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels, position_ids: [len(rows), T] LongTensors, T the longest row."""
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, start:start + n] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[r, start:start + n] = 1
            labels[r, start + 1:start + n] = torch.tensor(example["labels"][1:], dtype=torch.long)
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(length - start)  # the padding: a segment of its own
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


class PackedMicroBatches:
    """`MicroBatches` with packed rows: micro-batch i is `micro_batch_size` rows of up to `max_seq_length` tokens."""

    def __init__(self, examples: Sequence[dict[str, list[int]]], micro_batch_size: int, shuffle: bool, seed: int,
                 pad_token_id: int, max_seq_length: int) -> None:
        if len(examples) == 0:
            raise ValueError("PackedMicroBatches needs at least one example")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.max_seq_length = max_seq_length
        self._lengths = np.array([len(e["input_ids"]) for e in examples])
        self._ends: list[int] = []  # rows in epochs 0..e together, for every epoch planned so far
        self._plans: dict[int, list[list[int]]] = {}  # epoch -> its rows (example indices), a small cache

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def rows(self, index: int) -> list[list[int]]:
        """The example indices in each row of micro-batch `index`."""
        if index < 0:
            raise IndexError(f"micro-batch index must be >= 0, got {index}")
        start = index * self.micro_batch_size
        return [self._row(r) for r in range(start, start + self.micro_batch_size)]

    def example_indices(self, index: int) -> list[int]:
        return [i for row in self.rows(index) for i in row]

    def get(self, index: int) -> dict[str, torch.Tensor]:
        rows = [[self.examples[i] for i in row] for row in self.rows(index)]
        return collate_packed(rows, self.pad_token_id)

    def tokens(self, index: int) -> int:
        return int(sum(self._lengths[i] for i in self.example_indices(index)))

    def _row(self, position: int) -> list[int]:
        """Row `position` of the stream of all epochs' rows."""
        while not self._ends or self._ends[-1] <= position:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self._plan(len(self._ends))))
        epoch = bisect.bisect_right(self._ends, position)
        first = self._ends[epoch - 1] if epoch else 0
        return self._plan(epoch)[position - first]

    def _plan(self, epoch: int) -> list[list[int]]:
        plan = self._plans.get(epoch)
        if plan is None:
            order = epoch_order(self.num_examples, self.shuffle, self.seed, epoch)
            plan = [[int(order[p]) for p in row] for row in pack_rows(self._lengths[order], self.max_seq_length)]
            if len(self._plans) >= 4:  # a worker reads rows in increasing order, from one or two epochs at a time
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan
        return plan
