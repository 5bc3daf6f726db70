"""The sender's replay log: what it keeps for a restarted receiving stage, and from where it is complete."""

from __future__ import annotations

import torch

from lopt_dist.transport.replay import ReplayLog


def _add(log: ReplayLog, m: int, numel: int = 4):
    message = log.add(m, dst=m % 2, header=torch.tensor([m]), wire=[torch.full((numel,), float(m))])
    log.posted(message)
    return message


def test_log_keeps_every_message_since_the_last_trim_and_replays_them_in_order():
    log = ReplayLog(max_bytes=10_000)
    for m in range(6):
        _add(log, m)
    assert [m.micro_batch for m in log.after(2)] == [3, 4, 5]
    log.trim(4)  # a checkpoint at micro-batch 4 was committed
    assert log.complete_from == 4 and [m.micro_batch for m in log.after(-1)] == [4, 5]
    assert log.nbytes == 2 * 4 * 4
    assert torch.equal(log.after(4)[0].tensors_to_send()[0], torch.full((4,), 5.0))


def test_a_full_log_drops_its_oldest_messages_and_says_from_where_it_is_complete():
    log = ReplayLog(max_bytes=3 * 16)  # three messages of 4 float32
    for m in range(5):
        _add(log, m)
    assert [m.micro_batch for m in log.after(-1)] == [2, 3, 4] and log.complete_from == 2
    empty = ReplayLog(max_bytes=0)  # keeps nothing once sent
    for m in range(3):
        _add(empty, m)
    assert empty.after(-1) == [] and empty.complete_from == 3 and empty.nbytes == 0
