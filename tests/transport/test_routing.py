"""Routing: every micro-batch goes once, from m % n_s to m % n_t, and each pair agrees on the order."""

import pytest

from lopt_dist.transport import BoundaryLayout, Transfer, step_micro_batches


@pytest.mark.parametrize("senders,receivers", [(1, 1), (2, 3), (4, 2), (3, 3)])
def test_every_micro_batch_is_sent_and_received_once(senders, receivers):
    layout = BoundaryLayout(senders=senders, receivers=receivers)
    window = step_micro_batches(first_step=2, num_steps=3, micro_batches_per_step=2 * layout.period)
    sent = [(t.micro_batch, i) for i in range(senders) for t in layout.sends(i, window)]
    got = [(t.micro_batch, j) for j in range(receivers) for t in layout.receives(j, window)]
    assert sorted(m for m, _ in sent) == list(window)
    assert sorted(m for m, _ in got) == list(window)
    assert all(i == m % senders for m, i in sent)
    assert all(j == m % receivers for m, j in got)


@pytest.mark.parametrize("senders,receivers", [(2, 3), (3, 2), (1, 4)])
def test_each_pair_sends_and_receives_in_the_same_order(senders, receivers):
    layout = BoundaryLayout(senders=senders, receivers=receivers)
    window = step_micro_batches(first_step=0, num_steps=2, micro_batches_per_step=layout.period)
    for i in range(senders):
        for j in range(receivers):
            to_j = [t.micro_batch for t in layout.sends(i, window) if t.peer == layout.receiver_rank(j)]
            from_i = [t.micro_batch for t in layout.receives(j, window) if t.peer == layout.sender_rank(i)]
            assert to_j == from_i == sorted(to_j)


def test_group_ranks_put_senders_first():
    layout = BoundaryLayout(senders=2, receivers=3)
    assert layout.world_size == 5 and layout.period == 6
    assert [layout.sender_rank(i) for i in range(2)] == [0, 1]
    assert [layout.receiver_rank(j) for j in range(3)] == [2, 3, 4]
    assert layout.sends(1, range(6)) == [Transfer(1, 3), Transfer(3, 2), Transfer(5, 4)]
    assert layout.receives(0, range(6)) == [Transfer(0, 0), Transfer(3, 1)]


def test_a_whole_step_gives_every_worker_the_same_share():
    layout = BoundaryLayout(senders=2, receivers=3)
    step = step_micro_batches(first_step=5, num_steps=1, micro_batches_per_step=12)
    assert step == range(60, 72)
    assert {len(layout.sends(i, step)) for i in range(2)} == {6}
    assert {len(layout.receives(j, step)) for j in range(3)} == {4}


def test_bad_sizes_and_ranks_are_refused():
    with pytest.raises(ValueError, match="both sides"):
        BoundaryLayout(senders=0, receivers=1)
    with pytest.raises(ValueError, match="receiving stage of 3"):
        BoundaryLayout(senders=2, receivers=3).receiver_rank(3)
    with pytest.raises(ValueError, match="step range"):
        step_micro_batches(first_step=0, num_steps=1, micro_batches_per_step=0)
