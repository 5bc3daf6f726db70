"""GPU telemetry: NVML finds the GPU a torch device really is; busy time comes from CUDA events."""

from __future__ import annotations

import time

import pytest
import torch

from lopt_dist.telemetry.memory import memory_snapshot
from lopt_dist.telemetry.nvml import Nvml, nvml_uuid
from lopt_dist.telemetry.timing import BusyClock

pytestmark = pytest.mark.gpu


def test_nvml_reads_the_gpu_of_the_torch_device_by_uuid():
    import pynvml

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    uuid = nvml_uuid(str(torch.cuda.get_device_properties(device).uuid))
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    assert pynvml.nvmlDeviceGetMemoryInfo(handle).total == pytest.approx(
        torch.cuda.get_device_properties(device).total_memory, rel=0.05)
    assert Nvml().used_bytes(uuid) > 0
    assert memory_snapshot(device)["nvml_used_bytes"] > 0


def test_busy_time_counts_the_kernel_not_its_launch():
    device = torch.device("cuda")
    torch.cuda.synchronize()
    clock = BusyClock(device)
    start = time.perf_counter()
    with clock.span():
        torch.cuda._sleep(200_000_000)  # a kernel that spins for ~0.1 s at 2 GHz
    launched_s = time.perf_counter() - start
    busy_s = clock.total_s()
    assert busy_s > 0.02 and busy_s > 5 * launched_s, (busy_s, launched_s)
