"""The activation channel between real Ray actors over real gloo: exact, ordered, complete, bounded."""

import pytest
import ray
import torch

from lopt_dist.transport import BoundaryLayout, ChannelError, step_micro_batches

from peers import BoundaryPeer, join_all, make_payload
from tests.listening import listening_addresses


@pytest.fixture(scope="module")
def peers(ray_local):
    # Five workers serve every test; each test builds its own boundary group among some of them.
    return [BoundaryPeer.remote() for _ in range(5)]


def _run(layout, peers, name, micro_batches, depth=2, dtype=torch.float32, delay_s=0.0):
    """Stream `micro_batches` across `layout`; returns what each sender reported and each receiver got."""
    senders, receivers = peers[: layout.senders], peers[layout.senders : layout.world_size]
    join_all(senders + receivers, name)

    def pairs(transfers):
        return [(t.micro_batch, t.peer) for t in transfers]

    # All ends at once: a send completes only when its receive is posted.
    sending = [
        p.send_all.remote(name, pairs(layout.sends(i, micro_batches)), depth, dtype)
        for i, p in enumerate(senders)
    ]
    receiving = [
        p.recv_all.remote(name, pairs(layout.receives(j, micro_batches)), delay_s)
        for j, p in enumerate(receivers)
    ]
    results = ray.get(sending + receiving, timeout=60)
    ray.get([p.leave.remote(name) for p in senders + receivers], timeout=60)
    return results[: layout.senders], results[layout.senders :]


def _assert_exact(received, dtype=torch.float32):
    for m, payload in received:
        expected = make_payload(m, dtype)
        assert list(payload) == list(expected)
        for key, tensor in payload.items():
            assert tensor.dtype == expected[key].dtype, key
            assert torch.equal(tensor, expected[key]), (m, key)


def test_one_to_one_varying_lengths(peers):
    layout = BoundaryLayout(senders=1, receivers=1)
    sent, [(received, stats)] = _run(layout, peers, "one-to-one", range(8))
    assert [m for m, _ in received] == list(range(8))
    assert len({p["hidden_states"].shape[1] for _, p in received}) > 1  # lengths did vary
    _assert_exact(received)
    assert stats.messages == 8 and stats.bytes == sent[0]["stats"].bytes > 0
    assert sent[0]["left"] == 0


def test_two_to_three_routes_every_micro_batch_in_order(peers):
    layout = BoundaryLayout(senders=2, receivers=3)
    window = step_micro_batches(first_step=1, num_steps=2, micro_batches_per_step=layout.period)
    _, received = _run(layout, peers, "two-to-three", window)
    for j, (got, stats) in enumerate(received):
        assert [m for m, _ in got] == [m for m in window if m % 3 == j]  # in order, none missing
        assert stats.messages == len(got)
        _assert_exact(got)
    assert sorted(m for got, _ in received for m, _ in got) == list(window)


def test_bfloat16_stays_bfloat16(peers):
    layout = BoundaryLayout(senders=1, receivers=1)
    _, [(received, _)] = _run(layout, peers, "bf16", range(3), dtype=torch.bfloat16)
    assert {p["hidden_states"].dtype for _, p in received} == {torch.bfloat16}
    _assert_exact(received, torch.bfloat16)


def test_slow_receiver_blocks_the_sender_at_depth(peers):
    layout = BoundaryLayout(senders=1, receivers=1)
    depth, delay_s = 2, 0.15
    [sent], [(received, _)] = _run(layout, peers, "slow", range(8), depth=depth, delay_s=delay_s)
    assert max(sent["outstanding"]) == sent["peak"] == depth
    # The sender could post `depth` at once, then only one per receive: it waited instead of dropping.
    assert sent["stats"].blocked_s > (8 - depth - 1) * delay_s * 0.8
    assert [m for m, _ in received] == list(range(8))
    _assert_exact(received)


def test_receiver_refuses_a_message_it_did_not_expect(peers):
    a, b = peers[:2]
    join_all([a, b], "misrouted")
    a.send_all.remote("misrouted", [(5, 1)], 1, flush=False)
    with pytest.raises(ChannelError, match="expected micro-batch 4"):
        ray.get(b.recv_all.remote("misrouted", [(4, 0)]), timeout=60)


def test_store_listens_on_the_given_address_only_and_warm_up_greets_routed_peers(peers):
    # 2 senders -> 1 receiver: both senders greet the receiver (rank 2), which greets them in order.
    port = join_all(peers[:3], "warm")
    assert listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0: nothing outside the address given
    greeted = ray.get([p.warm_up.remote("warm", 2, 1) for p in peers[:3]], timeout=60)
    assert greeted == [[2], [2], [0, 1]]
    ray.get([p.leave.remote("warm") for p in peers[:3]], timeout=60)


def test_evaluation_micro_batches_travel_between_training_ones_without_moving_the_cursor(peers):
    """Evaluation messages (negative numbers, header.evaluation_micro_batch) are posted in stream order but
    kept out of the replay log, and a receiver's cursor (what a restarted sender resumes from) ignores them."""
    sender, receiver = peers[0], peers[1]
    join_all([sender, receiver], "with-evaluation")
    order = [0, 1, -1, -2, 2, -1]
    sending = sender.send_all.remote("with-evaluation", [(m, 1) for m in order], 2,
                                      replay_bytes=2**20)  # to boundary rank 1
    receiving = receiver.recv_all.remote("with-evaluation", [(m, 0) for m in order])
    sent, (received, stats) = ray.get([sending, receiving], timeout=60)
    assert [m for m, _ in received] == order
    _assert_exact(received)
    assert stats.messages == len(order) and sent["left"] == 0
    assert ray.get(sender.replay_log_micro_batches.remote()) == [0, 1, 2]
    assert ray.get(receiver.cursor.remote()) == 3
    ray.get([p.leave.remote("with-evaluation") for p in (sender, receiver)], timeout=60)
