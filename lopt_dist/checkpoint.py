"""Checkpoint directories: staged, committed by one rename, pointed to by `latest`, pruned to `keep_last`.

Layout under `<output_dir>/checkpoints/`:
    step_000004/            one committed checkpoint
        state.json          next step, micro-batches consumed, the run's config
        stage_0/, stage_1/  each stage's DeepSpeed (or single-process) state, written by its workers
    latest                  the name of the newest committed checkpoint
A crash while writing leaves only a `.staging-*` directory, which is never read and is removed next time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lopt_dist.config import ConfigError, ExperimentConfig

# What must not change between a checkpoint and the run that resumes it: the batches and the model cut.
_MUST_MATCH = (
    ("model", "name"), ("model", "boundaries"), ("data", "source"), ("data", "hub_config"), ("data", "split"),
    ("data", "format"), ("data", "max_seq_length"), ("data", "shuffle"), ("data", "seed"),
    ("data", "max_samples"), ("data", "builtin_samples"), ("train", "method"), ("train", "micro_batch_size"),
    ("train", "micro_batches_per_step"), ("train", "dtype"), ("runtime", "mode"),
)


class Checkpoints:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def remove_stale(self) -> None:
        """Drop what a crashed run left half-written; call once, before this run stages anything."""
        for stale in self.root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def staging(self, step: int) -> Path:
        """A fresh directory for the workers to write step `step`'s checkpoint into."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".staging-step_{step:06d}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def commit(self, staging: Path, step: int, cfg: ExperimentConfig) -> Path:
        """Seal a staged checkpoint: state.json, one rename, then the `latest` pointer, then pruning."""
        state = {"step": step, "micro_batches_consumed": step * cfg.train.micro_batches_per_step,
                 "config": cfg.to_dict()}
        _write_atomic(staging / "state.json", json.dumps(state, indent=2))
        final = self.root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_atomic(self.root / "latest", final.name)
        self._prune()
        return final

    def resolve(self, resume: str) -> Path:
        """'latest' or a checkpoint directory -> a committed checkpoint directory."""
        if resume == "latest":
            pointer = self.root / "latest"
            if not pointer.is_file():
                raise ConfigError(f"checkpoint.resume: 'latest' but {self.root} holds no checkpoint yet")
            path = self.root / pointer.read_text().strip()
        else:
            path = Path(resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"checkpoint.resume: {path} is not a committed checkpoint (no state.json)")
        return path

    def committed(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())

    def _prune(self) -> None:
        for old in self.committed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The checkpoint's state, after checking that `cfg` would feed the same batches to the same stages."""
    state = json.loads((path / "state.json").read_text())
    saved, now = state["config"], cfg.to_dict()
    for section, key in _MUST_MATCH:
        if saved[section][key] != now[section][key]:
            raise ConfigError(
                f"{section}.{key}: is {now[section][key]!r} but the checkpoint {path} was made with "
                f"{saved[section][key]!r}; resuming would change the batches or the model, so keep it as it was"
            )
    saved_workers = [g["workers"] for g in saved["runtime"]["groups"]]
    now_workers = [g["workers"] for g in now["runtime"]["groups"]]
    if cfg.runtime.mode == "ray" and saved_workers != now_workers:
        raise ConfigError(f"runtime.groups: workers {now_workers} differ from the checkpoint's {saved_workers}; "
                          "DeepSpeed states are sharded per worker, so resume with the same group sizes")
    if state["step"] >= cfg.train.steps:
        raise ConfigError(f"train.steps: the checkpoint {path} is already at step {state['step']}; "
                          f"set train.steps above {state['step']} to train further")
    return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
