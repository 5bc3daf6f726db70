"""The machine and software a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch

from .measure import cpu_name

_PACKAGES = ("torch", "ray", "deepspeed", "transformers", "lopt-dist")


def environment() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "load_average_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine makes timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
