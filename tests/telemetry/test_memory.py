"""Per-step memory peaks: a reset forgets what an earlier step (or model loading) touched."""

import mmap

import torch

from lopt_dist.telemetry.memory import current_rss_bytes, memory_snapshot, peak_rss_bytes, reset_peak

MIB = 1 << 20


def _touch(nbytes: int) -> None:
    """Make `nbytes` newly resident, then give them back: a fresh anonymous mapping, written, unmapped (an
    allocator could instead reuse pages an earlier test left resident, and RSS would not grow)."""
    with mmap.mmap(-1, nbytes) as block:
        block.write(b"\1" * nbytes)


def test_peak_covers_a_freed_allocation_then_reset_forgets_it():
    reset_peak(torch.device("cpu"))
    before = current_rss_bytes()
    _touch(256 * MIB)
    assert peak_rss_bytes() >= before + 200 * MIB
    floor = reset_peak(torch.device("cpu"))
    assert peak_rss_bytes() < floor + 100 * MIB
    _touch(64 * MIB)
    assert floor + 40 * MIB <= peak_rss_bytes() < floor + 200 * MIB


def test_snapshot_reports_rss_and_peak_on_cpu():
    snap = memory_snapshot(torch.device("cpu"))
    assert 0 < snap["rss_bytes"] <= snap["peak_rss_bytes"]
    assert not any(key.startswith("cuda") for key in snap)
