"""Per-step metrics: one JSON object a line, flushed every step so a crash loses nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """`start_step` > 0 (a resumed run): the records of earlier steps are kept and every later one is dropped
    first, so a run resumed from an older checkpoint never repeats a step. 0: a new file."""

    def __init__(self, path: str | Path, start_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            self._fh = None
            self.truncate(start_step)
        else:
            self._fh = open(self.path, "w")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def truncate(self, step: int) -> None:
        """Keep only the records of steps before `step`, atomically: a crash leaves the old file or the new one."""
        if self._fh is not None:
            self._fh.close()
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the torn last line of a run that was killed mid-write
                if isinstance(record, dict) and record.get("step", step) < step:
                    kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a")

    rewind = truncate  # the run restarted from the checkpoint of `step` (telemetry/sinks.py)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class TensorBoardLog:
    """The numeric fields of each record as TensorBoard scalars, keyed by step."""

    def __init__(self, log_dir: str | Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("logging.report_to: tensorboard needs the tensorboard package: pip install tensorboard") from err
        # Events are logged at record step + 1; a run resumed at `start_step` rewrites those from start_step + 1 on,
        # so TensorBoard is told to drop every older event at or after that step.
        self._log_dir = str(log_dir)
        self._writer = SummaryWriter(self._log_dir, purge_step=start_step + 1 if start_step else None)

    def rewind(self, step: int) -> None:
        """A run restarted from the checkpoint of `step`: the events of later steps are dropped (when read)."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer.close()
        self._writer = SummaryWriter(self._log_dir, purge_step=step + 1)

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
