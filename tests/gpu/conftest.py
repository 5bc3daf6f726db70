"""The GPU check suite's tests: marked `gpu`, skipped where torch sees no CUDA device.

Run them (and the GPU benchmark rows) with `python -m tools.gpu_suite --out DIR` on a machine with a GPU; the
CPU CI collects them and reports them skipped, so they never decide its pass or fail.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (python -m tools.gpu_suite runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
