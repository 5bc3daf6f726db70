"""Per-step metrics: one JSON object a line, flushed every step so a crash loses nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardLog:
    """The numeric fields of each record as TensorBoard scalars, keyed by step."""

    def __init__(self, log_dir: str | Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("logging.tensorboard needs the tensorboard package: pip install tensorboard") from err
        self._writer = SummaryWriter(str(log_dir), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, record["step"] + 1)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
