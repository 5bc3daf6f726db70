"""Which worker sends which micro-batch to whom, decided by arithmetic alone.

Micro-batch m (its index counted from the start of the run) is produced by stage-s worker m % n_s and
consumed by stage-(s+1) worker m % n_t. Every worker walks its micro-batches in increasing m, so each
(sender, receiver) pair posts its sends and receives in the same order. That matters because gloo and
NCCL match point-to-point messages by order, not by name; and because the oldest undelivered micro-batch
can always move, a bounded sender can never wait on a receiver that waits on it.

An optimizer step covers M micro-batches, M a multiple of lcm(all group sizes) (the config enforces it),
so every worker gets the same number of micro-batches per step and steps end at the same index everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Transfer:
    micro_batch: int  # global index within the run
    peer: int  # the other end's rank in the boundary group


@dataclass(frozen=True, kw_only=True)
class BoundaryLayout:
    """The boundary between a stage of `senders` workers and the next stage of `receivers` workers."""

    senders: int
    receivers: int

    def __post_init__(self) -> None:
        if self.senders < 1 or self.receivers < 1:
            raise ValueError(f"both sides need a worker, got {self.senders} -> {self.receivers}")

    @property
    def world_size(self) -> int:
        return self.senders + self.receivers

    @property
    def period(self) -> int:
        """Micro-batches after which the pattern of pairs repeats; a step must be a multiple of it."""
        return math.lcm(self.senders, self.receivers)

    def sender_rank(self, dp_rank: int) -> int:
        """Boundary-group rank of the sending stage's worker with data-parallel rank `dp_rank`."""
        _check_rank(dp_rank, self.senders, "sending")
        return dp_rank

    def receiver_rank(self, dp_rank: int) -> int:
        """Boundary-group rank of the receiving stage's worker with data-parallel rank `dp_rank`."""
        _check_rank(dp_rank, self.receivers, "receiving")
        return self.senders + dp_rank

    def producer(self, micro_batch: int) -> int:
        """Data-parallel rank, in the sending stage, of the worker that sends `micro_batch`."""
        return micro_batch % self.senders

    def consumer(self, micro_batch: int) -> int:
        """Data-parallel rank, in the receiving stage, of the worker that receives `micro_batch`."""
        return micro_batch % self.receivers

    def sends(self, dp_rank: int, micro_batches: range) -> list[Transfer]:
        """What sending worker `dp_rank` sends among `micro_batches`, in the order it must send them."""
        _check_rank(dp_rank, self.senders, "sending")
        return [
            Transfer(m, self.receiver_rank(self.consumer(m)))
            for m in micro_batches
            if self.producer(m) == dp_rank
        ]

    def receives(self, dp_rank: int, micro_batches: range) -> list[Transfer]:
        """What receiving worker `dp_rank` receives among `micro_batches`, in the order it must take them."""
        _check_rank(dp_rank, self.receivers, "receiving")
        return [
            Transfer(m, self.sender_rank(self.producer(m)))
            for m in micro_batches
            if self.consumer(m) == dp_rank
        ]


def step_micro_batches(first_step: int, num_steps: int, micro_batches_per_step: int) -> range:
    """Global micro-batch indices of optimizer steps first_step .. first_step + num_steps - 1."""
    if first_step < 0 or num_steps < 0 or micro_batches_per_step < 1:
        raise ValueError(
            f"bad step range: first {first_step}, count {num_steps}, per step {micro_batches_per_step}"
        )
    start = first_step * micro_batches_per_step
    return range(start, start + num_steps * micro_batches_per_step)


def _check_rank(dp_rank: int, size: int, side: str) -> None:
    if not 0 <= dp_rank < size:
        raise ValueError(f"data-parallel rank {dp_rank} is not in the {side} stage of {size} workers")
