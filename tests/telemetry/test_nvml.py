"""NVML is asked about the GPU by its UUID (torch's index is not NVML's under CUDA_VISIBLE_DEVICES), is
initialised once per process, and is not asked again once it proved missing. NVML itself needs a GPU driver,
so a stand-in library records the calls; tests/gpu/test_telemetry_cuda.py uses the real one."""

from __future__ import annotations

from types import SimpleNamespace

from lopt_dist.telemetry.nvml import Nvml, nvml_uuid


class RecordingNvml:
    def __init__(self, fail_init: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_init = fail_init

    def nvmlInit(self):
        self.calls.append(("init",))
        if self.fail_init:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(("handle", uuid))
        return f"handle:{uuid}"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.calls.append(("memory", handle))
        return SimpleNamespace(used=123 if handle == "handle:GPU-abc" else 456)


def test_uuid_spelling():
    assert nvml_uuid("abc") == "GPU-abc"
    assert nvml_uuid("GPU-abc") == "GPU-abc" and nvml_uuid("MIG-xyz") == "MIG-xyz"


def test_gpu_is_found_by_uuid_and_nvml_starts_once():
    library = RecordingNvml()
    nvml = Nvml(library)
    assert [nvml.used_bytes("abc"), nvml.used_bytes("GPU-abc"), nvml.used_bytes("def")] == [123, 123, 456]
    assert library.calls.count(("init",)) == 1
    assert [c for c in library.calls if c[0] == "handle"] == [("handle", "GPU-abc"), ("handle", "GPU-def")]


def test_missing_nvml_reports_nothing_and_is_not_retried():
    library = RecordingNvml(fail_init=True)
    nvml = Nvml(library)
    assert nvml.used_bytes("abc") is None and nvml.used_bytes("abc") is None
    assert library.calls == [("init",)]
