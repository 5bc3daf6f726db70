"""WorkerGroup on a real local Ray cluster of 4 CPUs: start-up, ranks, calls, failures, shutdown and gloo."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table
from ray.util.state import list_actors

from lopt_dist.pipeline.errors import (
    WorkerFailedError,
    WorkerGroupError,
    WorkerGroupStartError,
    WorkerTimeoutError,
)
from lopt_dist.pipeline.futures import wait_all
from lopt_dist.pipeline.group import WorkerGroup
from lopt_dist.pipeline.worker import NodeInfo, WorkerBase, assign_ranks
from tests.listening import listening_addresses

CLUSTER_CPUS = 4
# Failures must surface this fast even though a healthy worker of the same call sleeps for a minute.
PROMPT_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # The dashboard stays on: ray.util.state.list_actors, which checks that shutdown kills the actors, asks it.
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=True)
    # Ray workers cannot import this test module (pytest put its folder on the driver's sys.path only), so
    # ship the worker classes defined here by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


class Probe(WorkerBase):
    def __init__(self, tag: str = "probe") -> None:
        self.tag = tag

    def whoami(self) -> tuple[str, object]:
        return self.tag, self.rank_info

    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()

    def add(self, a: int, b: int = 0) -> int:
        return self.rank_info.rank + a + b

    def env(self, key: str) -> str | None:
        return os.environ.get(key)

    def raise_on(self, rank: int, sleep_s: float) -> None:
        if self.rank_info.rank == rank:
            raise ValueError(f"bad batch on rank {rank}")
        time.sleep(sleep_s)

    def exit_on(self, rank: int, sleep_s: float) -> None:
        if self.rank_info.rank == rank:
            os._exit(1)
        time.sleep(sleep_s)

    def collective_timeout_s(self) -> float:
        import torch
        import torch.distributed as dist

        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()

    def all_reduce(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value])
        dist.all_reduce(tensor)
        return tensor.item()


class BrokenInit(WorkerBase):
    def __init__(self) -> None:
        raise RuntimeError("no config given")


def make_group(num_workers: int, name: str, cpus: float = 0.5, **kwargs) -> WorkerGroup:
    kwargs.setdefault("start_timeout_s", 30)
    return WorkerGroup.create(Probe, num_workers, name=name, cpus_per_worker=cpus, **kwargs)


def pending_placement_groups() -> list[dict]:
    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def test_execute_calls_every_worker_in_rank_order():
    with make_group(3, "stage 0") as group:
        assert len(group) == 3
        assert group.execute("add", 10) == [10, 11, 12]
        assert group.execute("add", 10, b=1) == [11, 12, 13]
        assert group.execute_single(2, "add", 1) == 3
        assert group.execute_per_rank("add", [(1,), (2,), (3,)]) == [1, 3, 5]
        labelled = group.label_refs(group.execute_async("add", 0))
        assert wait_all(labelled) == {"stage 0 worker 0": 0, "stage 0 worker 1": 1, "stage 0 worker 2": 2}
        with pytest.raises(AttributeError, match="Probe .*'stage 0'.* no method 'ad'"):
            group.execute("ad", 1)
        with pytest.raises(ValueError, match="3 workers, got 2"):
            group.execute_per_rank("add", [(1,), (2,)])


def test_workers_know_their_ranks_and_the_rendezvous():
    with make_group(3, "stage 0", init_kwargs={"tag": "s0"}) as group:
        tags, infos = zip(*group.execute("whoami"))
        assert tags == ("s0",) * 3
        assert list(infos) == list(group.rank_infos)
        assert [i.rank for i in infos] == [0, 1, 2]
        # One node: local ranks are the ranks.
        assert [i.local_rank for i in infos] == [0, 1, 2]
        assert {(i.world_size, i.local_world_size) for i in infos} == {(3, 3)}
        assert {i.node_id for i in infos} == {ray.get_runtime_context().get_node_id()}
        assert {i.gpu_ids for i in infos} == {()}
        assert group.master_addr == infos[0].node_ip
        assert 0 < group.master_port < 65536


def test_ranks_are_grouped_by_node_then_gpu_id():
    # Bundles land on two nodes, interleaved, with GPU ids out of order ("10" after "9").
    infos = [
        NodeInfo("node-b", "10.0.0.2", ("1",)),
        NodeInfo("node-a", "10.0.0.1", ("10",)),
        NodeInfo("node-b", "10.0.0.2", ("0",)),
        NodeInfo("node-a", "10.0.0.1", ("9",)),
    ]
    ranked = assign_ranks(infos)
    assert [index for index, _ in ranked] == [2, 0, 3, 1]  # the first bundle's node comes first
    assert [r.rank for _, r in ranked] == [0, 1, 2, 3]
    assert [r.local_rank for _, r in ranked] == [0, 1, 0, 1]
    assert [r.node_ip for _, r in ranked] == ["10.0.0.2", "10.0.0.2", "10.0.0.1", "10.0.0.1"]
    assert [r.gpu_ids for _, r in ranked] == [("0",), ("1",), ("9",), ("10",)]
    assert {(r.world_size, r.local_world_size) for _, r in ranked} == {(4, 2)}


def test_groups_of_different_sizes_run_side_by_side():
    # Together they take the whole cluster; one wait covers both, labels say which group answered.
    with make_group(1, "stage 0", cpus=1, init_args=("s0",)) as first, make_group(3, "stage 1", cpus=1) as second:
        results = wait_all(
            {**first.label_refs(first.execute_async("whoami")), **second.label_refs(second.execute_async("whoami"))}
        )
        assert list(results) == ["stage 0 worker 0", "stage 1 worker 0", "stage 1 worker 1", "stage 1 worker 2"]
        assert [(tag, info.world_size) for tag, info in results.values()] == [("s0", 1)] + [("probe", 3)] * 3


def test_request_larger_than_the_cluster_fails_fast():
    start = time.monotonic()
    with pytest.raises(WorkerGroupStartError) as err:
        make_group(3, "stage 1", cpus=2, start_timeout_s=60)
    assert time.monotonic() - start < PROMPT_S
    message = str(err.value)
    for part in ("'stage 1'", "3 workers x (2 CPU) = 6 CPU", "only 4 CPU", "4 CPU, 0 GPU in all", "fewer workers"):
        assert part in message
    assert not pending_placement_groups()


def test_start_times_out_while_others_hold_the_resources():
    with make_group(1, "holder", cpus=3):
        start = time.monotonic()
        with pytest.raises(WorkerGroupStartError, match=r"within 1 s.*1 CPU, 0 GPU free now"):
            make_group(2, "late", cpus=1, start_timeout_s=1)
        assert time.monotonic() - start < PROMPT_S
        assert len(pending_placement_groups()) == 1  # the holder's; the late one's reservation is gone
    # Nothing leaked: the same request fits once the holder is gone.
    with make_group(2, "late", cpus=1, start_timeout_s=10) as late:
        assert late.execute("add", 0) == [0, 1]


def test_worker_that_fails_in_init_fails_the_start():
    with pytest.raises(WorkerGroupStartError, match="(?s)'broken' failed to start.*RuntimeError: no config given"):
        WorkerGroup.create(BrokenInit, 2, name="broken", cpus_per_worker=0.5, start_timeout_s=30)
    assert not pending_placement_groups()


def test_create_checks_its_arguments():
    with pytest.raises(TypeError, match="subclass of WorkerBase"):
        WorkerGroup.create(object, 1, name="x", cpus_per_worker=1, start_timeout_s=5)
    with pytest.raises(TypeError, match="plain class"):
        WorkerGroup.create(ray.remote(Probe), 1, name="x", cpus_per_worker=1, start_timeout_s=5)
    with pytest.raises(ValueError, match="no resources per worker"):
        make_group(1, "x", cpus=0)


def test_raising_worker_is_reported_at_once_across_groups():
    with make_group(1, "stage 0") as sleeper, make_group(2, "stage 1") as failing:
        refs = {
            **sleeper.label_refs(sleeper.execute_async("raise_on", -1, 60)),
            **failing.label_refs(failing.execute_async("raise_on", 1, 60)),
        }
        start = time.monotonic()
        with pytest.raises(WorkerFailedError) as err:
            wait_all(refs)
        assert time.monotonic() - start < PROMPT_S
    assert err.value.label == "stage 1 worker 1"
    assert not err.value.died
    assert err.value.error == "ValueError: bad batch on rank 1"
    assert "stage 1 worker 1 raised: ValueError: bad batch on rank 1" in str(err.value)
    assert "in raise_on" in err.value.details  # the remote traceback


def test_dead_worker_is_reported_at_once():
    with make_group(2, "stage 0") as group:
        start = time.monotonic()
        with pytest.raises(WorkerFailedError, match="stage 0 worker 0 died") as err:
            group.execute("exit_on", 0, 60)
        assert time.monotonic() - start < PROMPT_S
    assert err.value.died and err.value.label == "stage 0 worker 0"


def test_wait_all_times_out_naming_who_is_late():
    with make_group(2, "stage 0") as group:
        refs = group.execute_async("raise_on", -1, 60)
        with pytest.raises(WorkerTimeoutError, match="0.5 s waiting on: stage 0 worker 0, stage 0 worker 1"):
            group.wait(refs, timeout_s=0.5)


def test_shutdown_kills_busy_workers_and_is_idempotent():
    group = make_group(2, "stage 0")
    actor_ids = group.execute("actor_id")
    group.execute_async("raise_on", -1, 60)  # busy workers must die too
    group.shutdown()
    group.shutdown()
    with pytest.raises(WorkerGroupError, match="shut down"):
        group.execute("add", 1)
    # Name our cluster: other Ray instances may run on this machine.
    gcs_address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + 10
    while True:
        probes = list_actors(address=gcs_address, filters=[("class_name", "=", "Probe")])
        states = {a.actor_id: a.state for a in probes}
        if all(states.get(actor_id) == "DEAD" for actor_id in actor_ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [states.get(actor_id) for actor_id in actor_ids] == ["DEAD", "DEAD"]
    assert "ALIVE" not in states.values()  # no test left a worker behind either
    assert not pending_placement_groups()


def test_init_torch_distributed_with_gloo():
    with make_group(2, "stage 0") as group:
        group.execute("init_torch_distributed", group.master_addr, group.master_port, "gloo", 60)
        # The store listens on the node's cluster address only (issue 14), through the port rank 0 held open.
        assert listening_addresses(group.master_port) == {group.master_addr}
        assert group.execute("env", "LOCAL_RANK") == ["0", "1"]
        assert group.execute("env", "MASTER_PORT") == [str(group.master_port)] * 2
        assert group.execute_per_rank("all_reduce", [(1.0,), (2.0,)]) == [3.0, 3.0]
        assert group.execute("collective_timeout_s") == [60.0, 60.0]  # runtime.collective_timeout_s lands here
