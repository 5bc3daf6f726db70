"""Padding token lists into batches, and the progress bars every evaluation phase shares."""

from __future__ import annotations

import sys
from typing import Iterator, Literal, Sequence, TypeVar

import torch
from tqdm import tqdm

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `size`, in order: the figures must not depend on anything but the inputs."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def pad(
    rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded ids, attention mask) as tensors on `device`.

    Generation pads on the left so that every row's next token is written at the same position; scoring
    pads on the right, where the padding sits after every token that is predicted.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def progress(desc: str, total: int, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
