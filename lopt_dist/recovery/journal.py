"""The record of a run's failures: `failures.jsonl` in output_dir, the log, and the progress line.

One JSON object a line per failure: the worker blamed (label, stage, node, pid), the step and phase, the
kind (died, raised, hung, unresponsive), the cause in one line, the remote traceback, what every other worker
was doing, and what the run did about it (`action`: which restart, or why it stopped). A resumed run appends;
a new run starts the file afresh.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lopt_dist.pipeline.errors import Failure

logger = logging.getLogger(__name__)

FILE_NAME = "failures.jsonl"


class FailureJournal:
    def __init__(self, output_dir: Path, resumed: bool) -> None:
        self.path = Path(output_dir) / FILE_NAME
        if not resumed:
            self.path.unlink(missing_ok=True)
        self.count = 0

    def record(self, failure: Failure, action: str, **extra) -> str:
        """Append the failure and what was done about it; returns the one-line account that was logged."""
        self.count += 1
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **failure.as_record(), "action": action, **extra}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
        line = f"failure {self.count}: {' '.join(failure.summary().split())} -> {action}"
        logger.warning("%s", line)
        for label, doing in failure.others.items():
            logger.warning("  meanwhile %s: %s", label, doing)
        return line


def read_failures(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / FILE_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
