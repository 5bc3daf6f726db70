"""The activation channel with CUDA tensors between Ray actors: gloo through pinned memory for two workers on
one GPU, NCCL device to device where two GPUs exist, and NCCL refused for workers sharing a GPU."""

from __future__ import annotations

import contextlib
import datetime
import sys

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lopt_dist.transport import (
    ActivationReceiver,
    ActivationSender,
    BoundaryLayout,
    create_boundary_group,
    find_free_port,
    warm_up,
)

pytestmark = pytest.mark.gpu
KEYS = ("hidden_states", "attention_mask")
TIMEOUT = datetime.timedelta(seconds=60)


@pytest.fixture(scope="module", autouse=True)
def ray_gpus():
    if not torch.cuda.is_available():
        yield
        return
    ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def payload(m: int) -> dict[str, torch.Tensor]:
    hidden = (torch.arange(2 * (5 + m) * 16, dtype=torch.float32).reshape(2, 5 + m, 16) / 7 + m)
    return {"hidden_states": hidden.to(torch.bfloat16).cuda(), "attention_mask": torch.ones(2, 5 + m).long().cuda()}


class Peer:
    def join(self, port: int, rank: int, backend: str) -> str:
        self.device = torch.device("cuda", 0)
        torch.cuda.set_device(self.device)
        self.link = create_boundary_group("127.0.0.1", port, rank, 2, backend, TIMEOUT, name="cuda",
                                          device=self.device)
        warm_up(self.link, BoundaryLayout(senders=1, receivers=1), self.device)
        return str(torch.cuda.get_device_properties(self.device).uuid)

    def send(self, count: int) -> None:
        sender = ActivationSender(self.link, KEYS, depth=2)
        for m in range(count):
            sender.send(payload(m), 1, m)
        sender.flush()

    def recv(self, count: int) -> list[bool]:
        receiver = ActivationReceiver(self.link, KEYS, self.device)
        exact = []
        for m in range(count):
            got = receiver.recv(0, m)
            exact.append(all(got[k].device == self.device and torch.equal(got[k], payload(m)[k]) for k in KEYS))
        return exact


@contextlib.contextmanager
def _pair(gpus_each: float):
    """Two peers; at half a GPU each they share one bundle of one GPU, so Ray puts both on the same GPU."""
    remote = ray.remote(num_gpus=gpus_each, num_cpus=0)(Peer)
    pg = placement_group([{"GPU": 1.0}] if gpus_each < 1 else [{"GPU": 1.0}] * 2)
    ray.get(pg.ready(), timeout=60)
    peers = [remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=0 if gpus_each < 1 else i)).remote() for i in range(2)]
    try:
        yield peers
    finally:
        for peer in peers:
            ray.kill(peer)
        remove_placement_group(pg)


def _exchange(peers, backend: str) -> tuple[list[str], list[bool]]:
    port = find_free_port()
    uuids = ray.get([p.join.remote(port, rank, backend) for rank, p in enumerate(peers)], timeout=120)
    sending = peers[0].send.remote(6)
    exact = ray.get(peers[1].recv.remote(6), timeout=120)
    ray.get(sending, timeout=120)
    return uuids, exact


def test_two_workers_on_one_gpu_stream_cuda_tensors_over_gloo_through_pinned_memory():
    with _pair(0.5) as peers:
        uuids, exact = _exchange(peers, "gloo")
    assert uuids[0] == uuids[1]  # one physical GPU
    assert exact == [True] * 6


def test_nccl_is_refused_for_two_workers_on_one_gpu():
    with _pair(0.5) as peers:
        port = find_free_port()
        joins = [p.join.remote(port, rank, "nccl") for rank, p in enumerate(peers)]
        for join in joins:
            with pytest.raises(ray.exceptions.RayTaskError, match="share one GPU"):
                ray.get(join, timeout=120)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two GPUs needs two GPUs")
def test_nccl_moves_cuda_tensors_between_two_gpus():
    with _pair(1.0) as peers:
        uuids, exact = _exchange(peers, "nccl")
    assert uuids[0] != uuids[1]
    assert exact == [True] * 6
