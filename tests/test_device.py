"""The device decision as pure functions: what a run, each worker and each boundary use (no CUDA, no Ray)."""

from __future__ import annotations

import pytest
import torch

from lopt_dist.config import ConfigError, load_config
from lopt_dist.device import (
    DeviceView,
    Slot,
    boundary_backend,
    cluster_uses_gpus,
    device_views,
    group_backend,
    local_device,
)


def test_local_device_follows_the_request_and_what_the_machine_has():
    assert local_device("auto", cuda_available=False) == torch.device("cpu")
    assert local_device("auto", cuda_available=True) == torch.device("cuda")
    assert local_device("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device: 'cuda' .* no CUDA device"):
        local_device("cuda", cuda_available=False)


def test_cluster_gpus_come_from_the_cluster_not_from_this_process():
    assert cluster_uses_gpus("auto", 4) and not cluster_uses_gpus("auto", 0)
    assert not cluster_uses_gpus("cpu", 4)
    # An autoscaling cluster that starts at 0 GPUs: `cuda` still asks for them (the start waits for them).
    assert cluster_uses_gpus("cuda", 0)


def test_each_worker_sees_every_pipeline_gpu_on_its_node_and_knows_its_own():
    slots = [Slot("a", ("3",)), Slot("a", ("10",)), Slot("b", ("0",)), Slot("a", ("9",)), Slot("b", ()), ]
    views = device_views(slots)
    assert views[0] == DeviceView(("3", "9", "10"), 0)  # numeric order: "10" after "9"
    assert views[1] == DeviceView(("3", "9", "10"), 2)
    assert views[2] == DeviceView(("0",), 0)
    assert views[3].index == 1 and views[3].torch_device() == torch.device("cuda", 1)
    assert views[4] == DeviceView() and views[4].torch_device() == torch.device("cpu")
    assert views[0].cuda_visible_devices == "3,9,10"
    # Two workers sharing a GPU (fractional GPUs) see the same device.
    shared = device_views([Slot("a", ("1",)), Slot("a", ("1",))])
    assert shared == [DeviceView(("1",), 0)] * 2


def test_a_group_may_not_put_two_ranks_on_one_gpu():
    assert group_backend(0, [Slot("a", ()), Slot("a", ())]) == "gloo"
    assert group_backend(0, [Slot("a", ("0",)), Slot("a", ("1",)), Slot("b", ("0",))]) == "nccl"
    with pytest.raises(ConfigError, match="runtime.gpus_per_worker: stage 1 worker 0 and stage 1 worker 1 .*same GPU"):
        group_backend(1, [Slot("a", ("0",), "stage 1 worker 0"), Slot("a", ("0",), "stage 1 worker 1")])


def test_boundary_transport_comes_from_the_members_devices():
    own = [Slot("a", ("0",), "s0w0"), Slot("a", ("1",), "s1w0")]
    shared = [Slot("a", ("0",), "s0w0"), Slot("a", ("0",), "s1w0")]
    on_cpu = [Slot("a", (), "s0w0"), Slot("a", (), "s1w0")]
    assert boundary_backend(0, "auto", own) == "nccl"
    assert boundary_backend(0, "auto", shared) == "gloo"  # NCCL cannot connect two ranks on one GPU
    assert boundary_backend(0, "auto", on_cpu) == "gloo"
    assert boundary_backend(0, "gloo", own) == "gloo"
    assert boundary_backend(0, "nccl", own) == "nccl"
    # The same GPU id on two nodes is two GPUs.
    assert boundary_backend(0, "auto", [Slot("a", ("0",)), Slot("b", ("0",))]) == "nccl"
    with pytest.raises(ConfigError, match="'nccl' cannot connect s0w0 and s1w0 \\(boundary 0\\): they share one GPU"):
        boundary_backend(0, "nccl", shared)
    with pytest.raises(ConfigError, match="'nccl' moves GPU tensors, but s0w0, s1w0 .* hold no GPU"):
        boundary_backend(0, "nccl", on_cpu)


@pytest.mark.parametrize(("overrides", "message"), [
    (["runtime.gpus_per_worker=1.5"], r"runtime\.gpus_per_worker: must be in \(0, 1\]"),
    (["runtime.gpus_per_worker=0"], r"runtime\.gpus_per_worker: must be in \(0, 1\]"),
    (["runtime.gpus_per_worker=0.5", "runtime.transport=nccl"],
     r"runtime\.transport: 'nccl' cannot connect workers that share a GPU"),
    (["runtime.collective_timeout_s=0"], r"runtime\.collective_timeout_s: must be > 0"),
])
def test_device_settings_are_checked_when_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)

