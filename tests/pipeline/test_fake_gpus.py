"""GPU placement on a CPU: a real multi-node Ray cluster (ray.cluster_utils) with fake GPU resources.

Ray assigns fake GPUs exactly as it assigns real ones (ids, CUDA_VISIBLE_DEVICES), so ranks, visible devices,
device indices, boundary-peer placement, fit checks, the wait for an autoscaler's GPUs, fractional GPUs and
the transport decision are all tested here without CUDA. The probe workers never start CUDA.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from lopt_dist.config import ConfigError, load_config
from lopt_dist.pipeline.driver import launch_pipeline
from lopt_dist.pipeline.errors import WorkerGroupStartError
from lopt_dist.pipeline.worker import WorkerBase


class Probe(WorkerBase):
    """Takes the stage worker's constructor arguments; reports what it was shown."""

    def __init__(self, cfg, stage_index: int) -> None:
        self.stage_index = stage_index

    def seen(self) -> dict:
        info = self.rank_info
        return {"stage": self.stage_index, "rank": info.rank, "local_rank": info.local_rank, "node": info.node_id,
                "gpu_ids": info.gpu_ids, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(self.torch_device())}


@pytest.fixture(scope="module")
def cluster():
    # The head has no GPU: the first test plays an autoscaling cluster that adds GPU nodes on demand.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cfg(sizes, *extra):
    groups = "[" + ", ".join(f"{{workers: {n}}}" for n in sizes) + "]"
    per_step = max(sizes) * 2 if len(set(sizes)) == 1 else 4
    return load_config(None, ["runtime.mode=ray", f"runtime.groups={groups}", "runtime.start_timeout_s=60",
                              f"model.boundaries={list(range(1, len(sizes)))}",
                              f"train.micro_batches_per_step={per_step}", *extra])


def _launch(cfg):
    launched = launch_pipeline(cfg, Probe)
    seen = [g.execute("seen") for g in launched.groups]
    return launched, seen


def test_device_cuda_waits_for_gpu_nodes_then_shows_each_worker_its_peers_gpu(cluster, caplog):
    outcome = {}

    def start():
        try:
            outcome["launched"] = launch_pipeline(_cfg([1, 1], "runtime.device=cuda"), Probe)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    with caplog.at_level(logging.WARNING, logger="lopt_dist.pipeline.placement"):
        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        time.sleep(1.0)
        assert starter.is_alive(), outcome  # waiting, not refused: the cluster has 0 GPUs so far
        cluster.add_node(num_cpus=4, num_gpus=2)  # what an autoscaler does once the placement group asks
        starter.join(timeout=60)
    assert "waiting up to 60 s for 2 GPUs; the cluster has 0 now" in caplog.text
    launched = outcome["launched"]
    try:
        (s0,), (s1,) = [g.execute("seen") for g in launched.groups]
        assert s0["node"] == s1["node"]  # boundary peers on one node
        assert {s0["gpu_ids"], s1["gpu_ids"]} == {("0",), ("1",)}
        # Each sees both GPUs (NCCL P2P to its peer) and uses its own, at its index in that list.
        assert s0["visible"] == s1["visible"] == "0,1"
        assert s0["device"] == f"cuda:{int(s0['gpu_ids'][0])}" and s1["device"] == f"cuda:{int(s1['gpu_ids'][0])}"
        assert launched.gpu and launched.group_backends == ["nccl", "nccl"]
        assert launched.boundary_backends == ["nccl"]
    finally:
        launched.shutdown()
    cluster.add_node(num_cpus=4, num_gpus=2)  # the later tests run on two GPU nodes
    cluster.wait_for_nodes()


def test_boundary_peers_share_a_node_and_ranks_follow_nodes(cluster):
    launched, (stage0, stage1) = _launch(_cfg([2, 2], "runtime.device=auto"))
    try:
        assert launched.placement.columns_kept
        for w0, w1 in zip(stage0, stage1):  # column i: worker i of each stage
            assert w0["node"] == w1["node"]
            assert w0["visible"] == w1["visible"] == "0,1"
            assert w0["gpu_ids"] != w1["gpu_ids"]
        assert [w["rank"] for w in stage0] == [0, 1]
        assert {w["node"] for w in stage0} == {w["node"] for w in stage1}
        if stage0[0]["node"] != stage0[1]["node"]:  # PACK may put both columns on one node or one on each
            assert [w["local_rank"] for w in stage0] == [0, 0]
        assert launched.boundary_backends == ["nccl"]
    finally:
        launched.shutdown()


def test_two_stages_share_one_gpu_with_fractional_gpus(cluster):
    launched, [(s0,), (s1,)] = _launch(_cfg([1, 1], "runtime.gpus_per_worker=0.5"))
    try:
        assert s0["node"] == s1["node"] and s0["gpu_ids"] == s1["gpu_ids"]
        assert s0["visible"] == s1["visible"] == s0["gpu_ids"][0] and s0["device"] == s1["device"] == "cuda:0"
        assert launched.boundary_backends == ["gloo"]  # NCCL cannot connect two ranks on one GPU
        assert launched.group_backends == ["nccl", "nccl"]  # each group alone on its GPU
    finally:
        launched.shutdown()
    with pytest.raises(ConfigError, match="runtime.transport: 'nccl' cannot connect workers that share a GPU"):
        _cfg([1, 1], "runtime.gpus_per_worker=0.5", "runtime.transport=nccl")


def test_columns_that_fit_no_node_fall_back_and_cpu_runs_see_no_gpu(cluster):
    # Columns of 2 workers x 3 CPUs need 6 CPUs on one node; nodes have 4.
    launched, [(s0,), (s1,)] = _launch(_cfg([1, 1], "runtime.groups.0.threads_per_worker=3",
                                            "runtime.groups.1.threads_per_worker=3", "runtime.device=cpu"))
    try:
        assert not launched.placement.columns_kept
        assert s0["visible"] is None and s0["device"] == s1["device"] == "cpu"
        assert launched.group_backends == ["gloo", "gloo"] and launched.boundary_backends == ["gloo"]
    finally:
        launched.shutdown()


def test_requests_that_cannot_fit_fail_fast_or_after_the_wait(cluster):
    started = time.monotonic()
    with pytest.raises(WorkerGroupStartError, match=r"need 10 CPUs .*no single node has 5 CPU"):
        launch_pipeline(_cfg([1, 1], "runtime.groups.0.threads_per_worker=5",
                             "runtime.groups.1.threads_per_worker=5", "runtime.device=cpu"), Probe)
    assert time.monotonic() - started < 5
    # More GPUs than the cluster has, with runtime.device: cuda: waited for (an autoscaler might add them).
    with pytest.raises(WorkerGroupStartError, match=r"did not get them within 1 s; no GPUs came"):
        launch_pipeline(_cfg([3, 3], "runtime.device=cuda", "runtime.start_timeout_s=1"), Probe)
    assert _released()


def _released(timeout_s: float = 10.0) -> bool:
    """True once no GPU is reserved any more (Ray frees placement groups asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0) > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
