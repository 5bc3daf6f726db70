"""The boundary group lives beside a worker's default group, or without one, and never becomes it; its members
check each other before any backend starts."""

import datetime

import pytest
import ray

from lopt_dist.transport import create_boundary_group, find_free_port
from lopt_dist.transport.boundary_group import members_problem

from peers import BoundaryPeer, join_all


@pytest.fixture
def pair(ray_local):
    # Fresh workers per test: a default group, once initialised in one, cannot be taken back.
    peers = [BoundaryPeer.remote(), BoundaryPeer.remote()]
    yield peers
    for peer in peers:
        ray.kill(peer)


def _exchange(pair, name):
    # Both ends at once: a send completes only when its receive is posted.
    sending = pair[0].send_all.remote(name, [(0, 1), (1, 1)], depth=2)
    receiving = pair[1].recv_all.remote(name, [(0, 0), (1, 0)])
    sent, (received, _) = ray.get([sending, receiving], timeout=60)
    return sent, received


def test_group_without_a_default_group(pair):
    join_all(pair, "bare")
    _, received = _exchange(pair, "bare")
    assert [m for m, _ in received] == [0, 1]
    # Building the boundary group must not have created a default group behind the worker's back.
    assert ray.get([p.default_group_state.remote() for p in pair]) == [{"initialized": False}] * 2
    ray.get([p.leave.remote("bare") for p in pair])  # shutdown() of an idle group returns


def test_group_beside_a_default_group(pair):
    # As DeepSpeed will: each worker first brings up its own default group (each its own world of one).
    ray.get([p.init_default_group.remote(find_free_port()) for p in pair], timeout=60)
    join_all(pair, "beside")
    _, received = _exchange(pair, "beside")
    assert [int(payload["labels"][0, 0]) for _, payload in received] == [0, 1]
    states = ray.get([p.default_group_state.remote() for p in pair])
    expected = {"initialized": True, "world_size": 1, "all_reduce": 1.0, "boundary_groups_registered": 0}
    assert states == [expected] * 2


def test_bad_arguments_fail_before_any_rendezvous():
    with pytest.raises(ValueError, match="backend"):
        create_boundary_group("127.0.0.1", 1, 0, 2, "mpi", datetime.timedelta(seconds=1))
    with pytest.raises(ValueError, match="rank 2"):
        create_boundary_group("127.0.0.1", 1, 2, 2, "gloo", datetime.timedelta(seconds=1))


def test_members_that_disagree_fail_naming_the_transports(pair):
    port = find_free_port()
    joins = [pair[0].join.remote("127.0.0.1", port, 0, 2, "split", "gloo"),
             pair[1].join.remote("127.0.0.1", port, 1, 2, "split", "nccl")]
    for join in joins:
        with pytest.raises(ray.exceptions.RayTaskError, match="different transports .*rank 0: gloo; rank 1: nccl"):
            ray.get(join, timeout=60)


def test_members_check_rules():
    gpu = [{"backend": "nccl", "device": "cuda:GPU-a"}, {"backend": "nccl", "device": "cuda:GPU-b"}]
    assert members_problem(gpu) is None
    assert members_problem([{"backend": "gloo", "device": "cuda:GPU-a"}] * 2) is None  # staged through host memory
    assert "ranks [0, 1] share one GPU" in members_problem([gpu[0], gpu[0]])
    assert "ranks [1] are not on a GPU" in members_problem([gpu[0], {"backend": "nccl", "device": "cpu"}])
