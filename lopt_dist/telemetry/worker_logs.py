"""A stage worker's own log file: what the libraries say while a worker sets up stays out of the driver's terminal.

Ray forwards everything a worker writes to stdout and stderr to the driver's terminal, where it would cut into the
progress bar. So in a worker, DeepSpeed's and transformers' informational messages, the progress bars transformers
and huggingface_hub draw while loading, and what is printed while the engine is built (DeepSpeed's op builder)
go to `output_dir/logs/stage<s>_worker<r>.log` only; warnings and errors still go to stderr as well, so they
reach the driver's terminal and Ray's worker logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_LIBRARIES = ("DeepSpeed", "transformers", "huggingface_hub")


def worker_log_path(output_dir: str, stage: int, rank: int) -> Path:
    return Path(output_dir) / "logs" / f"stage{stage}_worker{rank}.log"


def route_library_output(path: Path, device_type: str) -> TextIO:
    """Send the libraries' INFO messages to `path` only (their warnings to stderr too) and turn their progress bars
    off; returns the open log file, for `printed_to`. `device_type`: the worker's device ("cpu" or "cuda")."""
    # DeepSpeed probes for an accelerator on first use and warns when it settles for the CPU; the worker's device
    # is already decided (lopt_dist/device.py), so say it. Imported here, so that its logger writes to the real
    # stdout, not to a redirected one.
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    import deepspeed  # noqa: F401

    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)  # line-buffered: a worker that dies leaves what it said
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _LIBRARIES:
        library = logging.getLogger(name)
        for existing in library.handlers:
            existing.setLevel(max(existing.level, logging.WARNING))
        library.addHandler(handler)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        pass
    else:
        disable_progress_bars()
    return log


@contextlib.contextmanager
def printed_to(log: TextIO) -> Iterator[None]:
    """What is printed (`print`, not logging) inside goes to `log`, e.g. DeepSpeed's "op built successfully"."""
    with contextlib.redirect_stdout(log):
        yield
